"""Demo upstream: a small CRM with customers and tickets, held in memory."""

from __future__ import annotations

import itertools
from typing import Literal

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel


class Customer(BaseModel):
    customer_id: str
    name: str
    region: str
    plan: str
    email: str


class Ticket(BaseModel):
    ticket_id: int
    customer_id: str
    subject: str
    status: Literal["open", "pending", "closed"]
    priority: Literal["low", "normal", "high"]


class TicketList(BaseModel):
    customer_id: str
    tickets: list[Ticket]


class Deleted(BaseModel):
    customer_id: str
    deleted: bool


def build_server() -> MCPServer:
    customers: dict[str, Customer] = {
        c.customer_id: c
        for c in [
            Customer(
                customer_id="C-1001",
                name="Acme Logistics",
                region="eu",
                plan="enterprise",
                email="ops@acme.example",
            ),
            Customer(
                customer_id="C-1002",
                name="Globex Retail",
                region="us",
                plan="business",
                email="it@globex.example",
            ),
            Customer(
                customer_id="C-1003",
                name="Initech Labs",
                region="eu",
                plan="starter",
                email="admin@initech.example",
            ),
        ]
    }
    tickets: list[Ticket] = [
        Ticket(
            ticket_id=501,
            customer_id="C-1001",
            subject="SSO login loops back to sign-in",
            status="open",
            priority="high",
        ),
        Ticket(
            ticket_id=502,
            customer_id="C-1001",
            subject="Invoice shows wrong VAT number",
            status="pending",
            priority="normal",
        ),
        Ticket(
            ticket_id=503,
            customer_id="C-1002",
            subject="Data export link expired",
            status="closed",
            priority="low",
        ),
    ]
    next_id = itertools.count(504)
    server = MCPServer("demo-crm", instructions="Look up customers and manage their support tickets.")

    def _customer(customer_id: str) -> Customer:
        if customer_id not in customers:
            raise ToolError(f"no customer with id {customer_id!r}")
        return customers[customer_id]

    @server.tool()
    def get_customer(customer_id: str) -> Customer:
        """Return a customer's record by id (e.g. C-1001)."""
        return _customer(customer_id)

    @server.tool()
    def list_tickets(
        customer_id: str, status: Literal["open", "pending", "closed"] | None = None
    ) -> TicketList:
        """List a customer's support tickets, optionally only those with the given status."""
        _customer(customer_id)
        found = [
            t for t in tickets if t.customer_id == customer_id and (status is None or t.status == status)
        ]
        return TicketList(customer_id=customer_id, tickets=found)

    @server.tool()
    def create_ticket(
        customer_id: str, subject: str, priority: Literal["low", "normal", "high"] = "normal"
    ) -> Ticket:
        """Open a new support ticket for a customer."""
        _customer(customer_id)
        ticket = Ticket(
            ticket_id=next(next_id),
            customer_id=customer_id,
            subject=subject,
            status="open",
            priority=priority,
        )
        tickets.append(ticket)
        return ticket

    @server.tool()
    def delete_customer(customer_id: str) -> Deleted:
        """Permanently delete a customer and their tickets. Destructive."""
        _customer(customer_id)
        del customers[customer_id]
        tickets[:] = [t for t in tickets if t.customer_id != customer_id]
        return Deleted(customer_id=customer_id, deleted=True)

    @server.resource("crm://customers", mime_type="application/json")
    def customer_index() -> str:
        """All customer ids and names."""
        return "\n".join(f"{c.customer_id}: {c.name}" for c in customers.values())

    @server.prompt()
    def summarize_customer(customer_id: str) -> str:
        """A prompt asking for a summary of a customer's account and open tickets."""
        return f"Summarize the account and open tickets of customer {customer_id}."

    return server


if __name__ == "__main__":
    from arbiter.demo._serve import serve

    serve(build_server())
