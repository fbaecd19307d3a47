"""Where Arbiter may connect: URL and address rules for upstreams, and the connect hook that applies them."""
