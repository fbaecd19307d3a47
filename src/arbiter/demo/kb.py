"""Demo upstream: a support knowledge base over the markdown documents bundled in ``docs/``."""

from __future__ import annotations

import re
from pathlib import Path

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

DOCS_DIR = Path(__file__).parent / "docs"


class DocHit(BaseModel):
    doc_id: str
    title: str
    snippet: str
    score: int


class SearchResult(BaseModel):
    query: str
    hits: list[DocHit]


def _load_docs() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(DOCS_DIR.glob("*.md"))}


def _title(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip()


def build_server() -> MCPServer:
    docs = _load_docs()
    server = MCPServer("support-kb", instructions="Search and read the support knowledge base.")

    @server.tool()
    def search_docs(query: str, limit: int = 3) -> SearchResult:
        """Full-text search over the support knowledge base; returns the best matching documents."""
        words = [w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 2]
        hits: list[DocHit] = []
        for doc_id, text in docs.items():
            lower = text.lower()
            score = sum(lower.count(w) for w in words)
            if score:
                body = " ".join(text.splitlines()[1:]).strip()
                hits.append(DocHit(doc_id=doc_id, title=_title(text), snippet=body[:160], score=score))
        hits.sort(key=lambda h: (-h.score, h.doc_id))
        return SearchResult(query=query, hits=hits[: max(1, min(limit, 10))])

    @server.tool()
    def get_doc(doc_id: str) -> str:
        """Return the full markdown text of one knowledge-base document."""
        if doc_id not in docs:
            raise ToolError(f"no document with id {doc_id!r}")
        return docs[doc_id]

    @server.resource("kb://docs/{doc_id}", mime_type="text/markdown")
    def doc_resource(doc_id: str) -> str:
        """A knowledge-base document as a resource."""
        if doc_id not in docs:
            raise ValueError(f"no document with id {doc_id!r}")
        return docs[doc_id]

    @server.resource("kb://index", mime_type="text/plain")
    def index() -> str:
        """The list of document ids and titles."""
        return "\n".join(f"{doc_id}: {_title(text)}" for doc_id, text in docs.items())

    @server.prompt()
    def answer_from_kb(question: str) -> str:
        """A prompt that asks the model to answer from the knowledge base only."""
        return f"Answer the customer's question using only the support knowledge base: {question}"

    return server


if __name__ == "__main__":
    from arbiter.demo._serve import serve

    serve(build_server())
