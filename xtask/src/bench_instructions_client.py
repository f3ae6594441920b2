# The third-party client of `cargo xtask bench-instructions` (xtask/src/bench_instructions.rs):
# Python websockets does TRIPS round trips of SIZE-byte messages on one connection.
#
#   python3 bench_instructions_client.py URL TRIPS SIZE [--deflate]
#
# Without --deflate: binary messages of SIZE x's, compression off. With --deflate: the client
# offers permessage-deflate (websockets' default), which the echo backend (ws-echo --deflate)
# accepts, and sends a different JSON-like text of SIZE bytes each time; the echo returns the
# compressed frames as they came, so the client inflates its own stream.
import asyncio
import json
import random
import sys

import websockets

WORDS = "alpha bravo delta order filled pending north east market limit cancel route".split()


def text(rng, seq, size):
    """A JSON-like text of exactly `size` bytes: items, then a note of words (below 64 bytes,
    words only)."""
    if size < 64:
        s = ""
        while len(s) < size:
            s += (rng.choice(WORDS) + " ")[: size - len(s)]
        return s
    head = '{"seq":%d,"event":"%s","items":[' % (seq, rng.choice(["update", "trade", "quote"]))
    items = []
    while True:
        item = json.dumps(
            {
                "id": rng.randrange(1_000_000),
                "user": "user-%d" % rng.randrange(5000),
                "price": round(rng.uniform(0, 10_000), 2),
                "qty": rng.randrange(500),
                "ts": "2026-11-30T%02d:%02d:%02d.%03dZ"
                % (rng.randrange(24), rng.randrange(60), rng.randrange(60), rng.randrange(1000)),
            },
            separators=(",", ":"),
        )
        if len(head) + len(",".join(items + [item])) + 12 > size:
            break
        items.append(item)
    s = head + ",".join(items) + '],"note":"'
    while len(s) + 2 < size:
        s += rng.choice(WORDS)[: size - 2 - len(s)]
        if len(s) + 2 < size:
            s += " "
    return s + '"}'


async def main(url, trips, size, deflate):
    compression = "deflate" if deflate else None
    async with websockets.connect(url, max_size=None, compression=compression) as ws:
        if deflate:
            ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            if not ext.startswith("permessage-deflate"):
                sys.exit("permessage-deflate was not negotiated (%r)" % ext)
        rng = random.Random(1)
        fixed = b"x" * size
        for seq in range(trips):
            msg = text(rng, seq, size) if deflate else fixed
            await ws.send(msg)
            if await ws.recv() != msg:
                sys.exit("echo differs")


asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "--deflate" in sys.argv[4:]))
