"""Reading a request body in an ASGI middleware and handing it on to the app."""

from __future__ import annotations


class TooLarge(Exception):
    pass


async def read_body(receive, limit: int | None = None) -> bytes | None:
    """The whole body (None if the client went away); TooLarge past `limit` bytes, read no further."""
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if limit is not None and len(body) > limit:
            raise TooLarge
    return bytes(body)


def replaying(body: bytes, receive):
    """A `receive` that gives the app `body` first, then whatever the client sends (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
