# ruff: noqa: E501  (quoted third-party descriptions, kept as their servers publish them)
"""Real-world tool definitions (as listed by widely used MCP servers) that must scan clean.

Each entry: (upstream, kind, definition). Texts follow the published servers' descriptions.
"""

from __future__ import annotations

from typing import Any


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or [], "additionalProperties": False}


def _s(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _n(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "number", "description": description, **extra}


_OWNER = _s("Repository owner (username or organization)")
_REPO = _s("Repository name")

BENIGN: list[tuple[str, str, dict[str, Any]]] = [
    # github/github-mcp-server
    (
        "github",
        "tool",
        {
            "name": "create_pull_request",
            "title": "Open new pull request",
            "description": "Create a new pull request in a GitHub repository.",
            "annotations": {"title": "Open new pull request", "readOnlyHint": False},
            "inputSchema": _obj(
                {
                    "owner": _OWNER,
                    "repo": _REPO,
                    "title": _s("PR title"),
                    "body": _s("PR description"),
                    "head": _s("Branch containing changes"),
                    "base": _s("Branch to merge into"),
                    "draft": {"type": "boolean", "description": "Create as draft PR"},
                    "maintainer_can_modify": {"type": "boolean", "description": "Allow maintainer edits"},
                },
                ["owner", "repo", "title", "head", "base"],
            ),
        },
    ),
    (
        "github",
        "tool",
        {
            "name": "create_or_update_file",
            "description": "Create or update a single file in a GitHub repository. If updating, you must "
            "provide the SHA of the file you want to update. Use this tool to create or update a file in a "
            "GitHub repository remotely; do not use it for local file operations.",
            "inputSchema": _obj(
                {
                    "owner": _OWNER,
                    "repo": _REPO,
                    "path": _s("Path where to create/update the file"),
                    "content": _s("Content of the file"),
                    "message": _s("Commit message"),
                    "branch": _s("Branch to create/update the file in"),
                    "sha": _s(
                        "Required if updating an existing file. The blob SHA of the file being replaced."
                    ),
                },
                ["owner", "repo", "path", "content", "message", "branch"],
            ),
        },
    ),
    (
        "github",
        "tool",
        {
            "name": "search_code",
            "description": "Fast and precise code search across ALL GitHub repositories using GitHub's native "
            "search engine. Best for finding exact symbols, functions, classes, or specific code patterns.",
            "inputSchema": _obj(
                {
                    "query": _s(
                        "Search query using GitHub's powerful code search syntax. Examples: 'content:Skill "
                        "language:Java org:github', 'NOT is:archived language:Python OR language:go', "
                        "'repo:github/github-mcp-server'. Supports exact matching, language filters, path "
                        "filters, and more."
                    ),
                    "sort": _s("Sort field ('indexed' only)"),
                    "order": _s("Sort order for results", enum=["asc", "desc"]),
                    "page": _n("Page number for pagination (min 1)", minimum=1),
                    "perPage": _n("Results per page for pagination (min 1, max 100)", minimum=1, maximum=100),
                },
                ["query"],
            ),
        },
    ),
    (
        "github",
        "tool",
        {
            "name": "create_issue",
            "description": "Create a new issue in a GitHub repository.",
            "inputSchema": _obj(
                {
                    "owner": _OWNER,
                    "repo": _REPO,
                    "title": _s("Issue title"),
                    "body": _s(
                        "Issue body content (Markdown supported). Example:\n## Steps to reproduce\n1. Run "
                        "`npm install`\n2. Run `npm test -- --watch=false`\n3. See `TypeError: cannot read "
                        "properties of undefined (reading 'map')`"
                    ),
                    "assignees": {"type": "array", "items": {"type": "string"}, "description": "Usernames"},
                    "labels": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Labels to apply",
                    },
                    "milestone": _n("Milestone number"),
                },
                ["owner", "repo", "title"],
            ),
        },
    ),
    (
        "github",
        "tool",
        {
            "name": "get_me",
            "description": 'Get details of the authenticated GitHub user. Use this when a request includes "me", '
            '"my". The output will not change unless the user changes their GitHub profile, so you only '
            "need to call this once.",
            "inputSchema": _obj({}),
        },
    ),
    # modelcontextprotocol/servers: filesystem
    (
        "filesystem",
        "tool",
        {
            "name": "read_text_file",
            "description": "Read the complete contents of a file from the file system as text. Handles various "
            "text encodings and provides detailed error messages if the file cannot be read. Use this tool "
            "when you need to examine the contents of a single file. Use the 'head' parameter to return "
            "only the first N lines of a file, or the 'tail' parameter to return only the last N lines of "
            "a file. Operates on the file as text regardless of extension. Only works within allowed "
            "directories.",
            "inputSchema": _obj(
                {
                    "path": {"type": "string"},
                    "tail": _n("If provided, returns only the last N lines of the file"),
                    "head": _n("If provided, returns only the first N lines of the file"),
                },
                ["path"],
            ),
        },
    ),
    (
        "filesystem",
        "tool",
        {
            "name": "edit_file",
            "description": "Make line-based edits to a text file. Each edit replaces exact line sequences with "
            "new content. Returns a git-style diff showing the changes made. Only works within allowed "
            "directories.",
            "inputSchema": _obj(
                {
                    "path": {"type": "string"},
                    "edits": {
                        "type": "array",
                        "items": _obj(
                            {
                                "oldText": _s("Text to search for - must match exactly"),
                                "newText": _s("Text to replace with"),
                            },
                            ["oldText", "newText"],
                        ),
                    },
                    "dryRun": {
                        "type": "boolean",
                        "default": False,
                        "description": "Preview changes using git-style diff format",
                    },
                },
                ["path", "edits"],
            ),
        },
    ),
    (
        "filesystem",
        "tool",
        {
            "name": "write_file",
            "description": "Create a new file or completely overwrite an existing file with new content. Use "
            "with caution as it will overwrite existing files without warning. Handles text content with "
            "proper encoding. Only works within allowed directories.",
            "inputSchema": _obj(
                {"path": {"type": "string"}, "content": {"type": "string"}}, ["path", "content"]
            ),
        },
    ),
    # Slack
    (
        "slack",
        "tool",
        {
            "name": "slack_post_message",
            "description": "Post a new message to a Slack channel",
            "inputSchema": _obj(
                {
                    "channel_id": _s("The ID of the channel to post to"),
                    "text": _s("The message text to post"),
                },
                ["channel_id", "text"],
            ),
        },
    ),
    (
        "slack",
        "tool",
        {
            "name": "slack_get_channel_history",
            "description": "Get recent messages from a channel",
            "inputSchema": _obj(
                {
                    "channel_id": _s("The ID of the channel"),
                    "limit": _n("Number of messages to retrieve (default 10)", default=10),
                },
                ["channel_id"],
            ),
        },
    ),
    # Postgres
    (
        "postgres",
        "tool",
        {
            "name": "query",
            "description": "Run a read-only SQL query",
            "inputSchema": _obj({"sql": {"type": "string"}}, ["sql"]),
        },
    ),
    # Stripe agent toolkit
    (
        "stripe",
        "tool",
        {
            "name": "create_payment_link",
            "description": "This tool will create a payment link in Stripe.\n\nIt takes two arguments:\n- price "
            "(str): The ID of the price to create the payment link for.\n- quantity (int): The quantity of "
            "the product to include in the payment link.",
            "inputSchema": _obj(
                {
                    "price": _s("The ID of the price to create the payment link for."),
                    "quantity": _n("The quantity of the product to include."),
                },
                ["price", "quantity"],
            ),
        },
    ),
    (
        "stripe",
        "tool",
        {
            "name": "create_refund",
            "description": "This tool will refund a payment intent in Stripe.\n\nIt takes three arguments:\n- "
            "payment_intent (str): The ID of the payment intent to refund, e.g. pi_3MtwBwLkdIwHu7ix28a3tqPa.\n"
            "- amount (int, optional): The amount to refund in cents.\n- reason (str, optional): The reason "
            "for the refund.",
            "inputSchema": _obj(
                {
                    "payment_intent": _s("The ID of the PaymentIntent to refund."),
                    "amount": _n("The amount to refund in cents."),
                    "reason": _s("Reason", enum=["duplicate", "fraudulent", "requested_by_customer"]),
                },
                ["payment_intent"],
            ),
        },
    ),
    # Sentry (uses <examples> and <hints> blocks in descriptions)
    (
        "sentry",
        "tool",
        {
            "name": "get_issue_details",
            "description": "Get detailed information about a specific Sentry issue by ID.\n\nUse this tool "
            "when you need to:\n- View detailed information about a specific issue\n- Access stacktraces "
            "and error details\n- Investigate a particular error\n\n<examples>\n### Get details for "
            "issue ID 'CLOUDFLARE-MCP-41'\n\n```\nget_issue_details(organizationSlug='my-organization', "
            "issueId='CLOUDFLARE-MCP-41')\n```\n</examples>\n\n<hints>\n- If the user provides the "
            "`issueUrl`, you can ignore the other parameters.\n</hints>",
            "inputSchema": _obj(
                {
                    "organizationSlug": _s(
                        "The organization's slug. You can find a list of existing "
                        "organizations you have access to using the `find_organizations()` tool."
                    ),
                    "issueId": _s("The Issue ID. e.g. `PROJECT-1Z43`"),
                    "issueUrl": _s(
                        "The URL of the issue. e.g. https://my-organization.sentry.io/issues/PROJECT-1Z43"
                    ),
                }
            ),
        },
    ),
    # Brave search
    (
        "brave",
        "tool",
        {
            "name": "brave_web_search",
            "description": "Performs a web search using the Brave Search API, ideal for general queries, news, "
            "articles, and online content. Use this for broad information gathering, recent events, or when "
            "you need diverse web sources. Supports pagination, content filtering, and freshness controls. "
            "Maximum 20 results per request, with offset for pagination. ",
            "inputSchema": _obj(
                {
                    "query": _s("Search query (max 400 chars, 50 words)"),
                    "count": _n("Number of results (1-20, default 10)", default=10),
                    "offset": _n("Pagination offset (max 9, default 0)", default=0),
                },
                ["query"],
            ),
        },
    ),
    # Puppeteer
    (
        "puppeteer",
        "tool",
        {
            "name": "puppeteer_screenshot",
            "description": "Take a screenshot of the current page or a specific element",
            "inputSchema": _obj(
                {
                    "name": _s("Name for the screenshot"),
                    "selector": _s("CSS selector for element to screenshot"),
                    "width": _n("Width in pixels (default: 800)"),
                    "height": _n("Height in pixels (default: 600)"),
                },
                ["name"],
            ),
        },
    ),
    (
        "puppeteer",
        "tool",
        {
            "name": "puppeteer_evaluate",
            "description": "Execute JavaScript in the browser console",
            "inputSchema": _obj({"script": _s("JavaScript code to execute")}, ["script"]),
        },
    ),
    # Git
    (
        "git",
        "tool",
        {
            "name": "git_diff",
            "description": "Shows differences between branches or commits",
            "inputSchema": _obj(
                {
                    "repo_path": {"type": "string"},
                    "target": {"type": "string"},
                    "context_lines": {"type": "integer", "default": 3},
                },
                ["repo_path", "target"],
            ),
        },
    ),
    # Google Drive
    (
        "gdrive",
        "tool",
        {
            "name": "gdrive_search",
            "description": "Search for files in Google Drive",
            "inputSchema": _obj({"query": _s("Search query")}, ["query"]),
        },
    ),
    # Memory (knowledge graph)
    (
        "memory",
        "tool",
        {
            "name": "create_relations",
            "description": "Create multiple new relations between entities in the knowledge graph. Relations "
            "should be in active voice",
            "inputSchema": _obj(
                {
                    "relations": {
                        "type": "array",
                        "items": _obj(
                            {
                                "from": _s("The name of the entity where the relation starts"),
                                "to": _s("The name of the entity where the relation ends"),
                                "relationType": _s("The type of the relation"),
                            },
                            ["from", "to", "relationType"],
                        ),
                    }
                },
                ["relations"],
            ),
        },
    ),
    # Time
    (
        "time",
        "tool",
        {
            "name": "convert_time",
            "description": "Convert time between timezones",
            "inputSchema": _obj(
                {
                    "source_timezone": _s(
                        "Source IANA timezone name (e.g., 'America/New_York', 'Europe/London'). Use 'UTC' as "
                        "local timezone if no source timezone provided by the user."
                    ),
                    "time": _s("Time to convert in 24-hour format (HH:MM)"),
                    "target_timezone": _s(
                        "Target IANA timezone name (e.g., 'Asia/Tokyo', 'America/San_Francisco')."
                    ),
                },
                ["source_timezone", "time", "target_timezone"],
            ),
        },
    ),
    # Fetch: its real description speaks to the model, but benignly.
    (
        "fetch",
        "tool",
        {
            "name": "fetch",
            "description": "Fetches a URL from the internet and optionally extracts its contents as markdown.\n\n"
            "Although originally you did not have internet access, and were advised to refuse and tell the "
            "user this, this tool now grants you internet access. Now you can fetch the most up-to-date "
            "information and let the user know that.",
            "inputSchema": _obj(
                {
                    "url": _s("URL to fetch", format="uri"),
                    "max_length": _n("Maximum number of characters to return.", default=5000),
                    "start_index": _n(
                        "On return output starting at this character index, useful if a previous fetch was "
                        "truncated and more context is required.",
                        default=0,
                    ),
                    "raw": {
                        "type": "boolean",
                        "default": False,
                        "description": "Get the actual HTML content of the requested page, without simplification.",
                    },
                },
                ["url"],
            ),
        },
    ),
    # Atlassian (Jira): long description with query-language examples
    (
        "jira",
        "tool",
        {
            "name": "jira_search",
            "description": "Search Jira issues using JQL (Jira Query Language).",
            "inputSchema": _obj(
                {
                    "jql": _s(
                        "JQL query string (Jira Query Language). Examples:\n"
                        '- Find Epics: "issuetype = Epic AND project = PROJ"\n'
                        '- Find issues in Epic: "parent = PROJ-123"\n'
                        "- Find by status: \"status = 'In Progress' AND project = PROJ\"\n"
                        '- Find by assignee: "assignee = currentUser()"\n'
                        '- Find recently updated: "updated >= -7d AND project = PROJ"\n'
                        '- Find by label: "labels = frontend AND project = PROJ"\n'
                        '- Find by priority: "priority = High AND project = PROJ"'
                    ),
                    "fields": _s(
                        "Comma-separated fields to return", default="summary,status,assignee,updated"
                    ),
                    "limit": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
                },
                ["jql"],
            ),
        },
    ),
    # AWS documentation server: long, with URLs and usage sections
    (
        "awsdocs",
        "tool",
        {
            "name": "read_documentation",
            "description": "Fetch and convert an AWS documentation page to markdown format.\n\n## Usage\n\nThis "
            "tool retrieves the content of an AWS documentation page and converts it to markdown format. "
            "For long documents, you can make multiple calls with start_index to retrieve the content in "
            "chunks.\n\n## URL Requirements\n\n- Must be from the docs.aws.amazon.com domain\n- Must end "
            "with .html\n\n## Example URLs\n\n- https://docs.aws.amazon.com/AmazonS3/latest/userguide/"
            "bucketnamingrules.html\n- https://docs.aws.amazon.com/lambda/latest/dg/lambda-invocation.html"
            "\n\n## Output Format\n\nThe output is formatted as markdown text with:\n- Preserved headings "
            "and structure\n- Code blocks for examples\n- Lists and tables converted to markdown format",
            "inputSchema": _obj(
                {
                    "url": _s("URL of the AWS documentation page to read"),
                    "max_length": {"type": "integer", "default": 5000, "exclusiveMinimum": 0},
                    "start_index": {"type": "integer", "default": 0, "minimum": 0},
                },
                ["url"],
            ),
        },
    ),
    # A prompt and a resource template from the reference "everything" server
    (
        "everything",
        "prompt",
        {
            "name": "complex_prompt",
            "description": "A prompt with arguments",
            "arguments": [
                {"name": "temperature", "description": "Temperature setting", "required": True},
                {"name": "style", "description": "Output style", "required": False},
            ],
        },
    ),
    (
        "everything",
        "resource_template",
        {
            "name": "Static Resource",
            "uriTemplate": "test://static/resource/{id}",
            "description": "A static resource with a numeric ID",
        },
    ),
]
