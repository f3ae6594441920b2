#!/usr/bin/env python3
"""WebSocket peers with permessage-deflate for tests/it/deflate.rs (Python `websockets`).

    deflate_peer.py server '{"server_no_context_takeover": true, ...}'
        An echo server compressing with those ServerPerMessageDeflateFactory parameters
        ("websockets_default": true for the library's defaults) (or,
        with "raw_extension": "x-foo", a raw server that answers the 101 with that extension
        and echoes every frame as it came, unmasked). Prints its port, then one line per
        connection: {"close_code": ...}.

    deflate_peer.py client '{"port": N, "params": {...}, "messages": [...], ...}'
        A client on websockets' sans-I/O protocol, so that it controls every write
        ("byte_writes": one byte per TCP segment). Each message {"kind": "text"|"binary",
        "size": n, "fragments": k, "seed": s} is sent and its echo checked. Prints one JSON
        line: the 101's extensions, the messages sent (base64), the close code received.

    deflate_peer.py raw '{"port": N, "offer": "...", "frames": [[fin, opcode, rsv1, b64], ...]}'
        Handshake offering `offer`, then the frames as given (masked), then reads until the
        connection closes. Prints {"extensions": ..., "close_code": ..., "frames": [...]}.
"""

import asyncio
import base64
import hashlib
import json
import os
import random
import socket
import struct
import sys
import time

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def message(kind, size, seed):
    if kind == "zeros":
        return bytes(size)
    if kind == "noise+zeros":
        # 20000 incompressible bytes (over the proxy's 16 KiB hold) before `size` zeros.
        return random.Random(seed).randbytes(20000) + bytes(size)
    rnd = random.Random(seed)
    if kind == "text":
        words = ["hello", "world", "nginx", "frame", "deflate", "tunnel", "json", "42", "{}"]
        out = []
        n = 0
        while n < size:
            w = rnd.choice(words) + " "
            out.append(w)
            n += len(w)
        return "".join(out)[:size].encode()
    # Binary: runs of a few byte values with some noise; compressible but not trivially.
    return bytes(rnd.choice(b"\x00\x01\x02\xfe\xff") if rnd.random() < 0.9 else rnd.randrange(256)
                 for _ in range(size))


def server(cfg):
    raw = cfg.pop("raw_extension", None)
    if raw is not None:
        return raw_server(raw)
    from websockets.asyncio.server import serve

    async def echo(ws):
        try:
            async for m in ws:
                await ws.send(m)
        except Exception:
            pass
        print(json.dumps({"close_code": ws.close_code}), flush=True)

    # "websockets_default": websockets' own permessage-deflate settings (12-bit windows).
    if cfg.pop("websockets_default", False):
        kw = {}
    else:
        kw = {"extensions": [ServerPerMessageDeflateFactory(**cfg)], "compression": None}

    async def main():
        async with serve(echo, "127.0.0.1", 0, max_size=None, **kw) as srv:
            print(srv.sockets[0].getsockname()[1], flush=True)
            await asyncio.Future()

    asyncio.run(main())


def read_http(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("closed during the handshake")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, rest


def read_frame(sock, buf):
    """One frame from sock (buf: bytes already read) -> (fin, opcode, rsv1, payload, rest)."""
    def need(n):
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError
            buf += chunk
    need(2)
    b0, b1 = buf[0], buf[1]
    ln = b1 & 0x7F
    pos = 2
    if ln == 126:
        need(4)
        ln = struct.unpack(">H", buf[2:4])[0]
        pos = 4
    elif ln == 127:
        need(10)
        ln = struct.unpack(">Q", buf[2:10])[0]
        pos = 10
    mask = None
    if b1 & 0x80:
        need(pos + 4)
        mask = buf[pos:pos + 4]
        pos += 4
    need(pos + ln)
    payload = buf[pos:pos + ln]
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bool(b0 & 0x80), b0 & 0x0F, bool(b0 & 0x40), payload, buf[pos + ln:]


def encode_frame(fin, opcode, rsv1, payload, mask):
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    ln = len(payload)
    m = 0x80 if mask else 0
    if ln < 126:
        head = bytes([b0, m | ln])
    elif ln < 65536:
        head = bytes([b0, m | 126]) + struct.pack(">H", ln)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", ln)
    if mask:
        key = os.urandom(4)
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def raw_server(extension):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    print(ls.getsockname()[1], flush=True)
    while True:
        c, _ = ls.accept()
        try:
            _, headers, buf = read_http(c)
            accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID)
                                      .digest()).decode()
            c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n"
                       "Sec-WebSocket-Extensions: %s\r\n\r\n" % (accept, extension)).encode())
            code = None
            while True:
                fin, op, rsv1, payload, buf = read_frame(c, buf)
                c.sendall(encode_frame(fin, op, rsv1, payload, False))
                if op == 8:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                    break
        except (EOFError, OSError):
            code = None
        print(json.dumps({"close_code": code}), flush=True)
        c.close()


def received_close(proto):
    return proto.close_rcvd.code if proto.close_rcvd is not None else None


def client(cfg):
    port = cfg["port"]
    path = cfg.get("path", "/")
    byte_writes = cfg.get("byte_writes", False)
    factory = ClientPerMessageDeflateFactory(**cfg.get("params", {}))
    proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"), extensions=[factory],
                           max_size=None)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(20)

    def flush():
        for data in proto.data_to_send():
            if byte_writes:
                for i in range(len(data)):
                    sock.sendall(data[i:i + 1])
                    time.sleep(0.0003)
            else:
                sock.sendall(data)

    pending = []

    def next_event():
        while not pending:
            data = sock.recv(65536)
            proto.receive_data(data)
            pending.extend(proto.events_received())
            flush()
            if not data:
                if not pending:
                    return None
        return pending.pop(0)

    proto.send_request(proto.connect())
    flush()
    response = next_event()
    if proto.handshake_exc is not None:
        raise proto.handshake_exc
    out = {"extensions": response.headers.get("Sec-WebSocket-Extensions"), "messages": []}
    close_code = None
    for m in cfg.get("messages", []):
        data = message(m["kind"], m["size"], m.get("seed", 0))
        k = max(1, m.get("fragments", 1))
        step = max(1, -(-len(data) // k))
        parts = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        for i, p in enumerate(parts):
            fin = i == len(parts) - 1
            if i > 0:
                proto.send_continuation(p, fin)
            elif m["kind"] == "text":
                proto.send_text(p, fin)
            else:
                proto.send_binary(p, fin)
        flush()
        out["messages"].append({"kind": m["kind"], "b64": base64.b64encode(data).decode()})
        if m.get("expect_close"):
            break
        got = b""
        while True:
            ev = next_event()
            if ev is None or ev.opcode == Opcode.CLOSE:
                close_code = received_close(proto)
                break
            if ev.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                got += ev.data
                if ev.fin:
                    break
        if close_code is not None:
            break
        assert got == data, f"echo differs: {len(got)} bytes back for {len(data)}"
    if close_code is None:
        if not cfg.get("expect_close_from_proxy"):
            proto.send_close(1000)
            flush()
        while True:
            try:
                ev = next_event()
            except (OSError, EOFError):
                break
            if ev is None:
                break
            if ev.opcode == Opcode.CLOSE:
                close_code = received_close(proto)
                flush()
                break
    out["close_code"] = close_code
    print(json.dumps(out), flush=True)


def raw(cfg):
    sock = socket.create_connection(("127.0.0.1", cfg["port"]))
    sock.settimeout(20)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Extensions: %s\r\n\r\n" % (cfg.get("path", "/"), key, cfg["offer"])).encode())
    status, headers, buf = read_http(sock)
    out = {"status": status, "extensions": headers.get("sec-websocket-extensions"),
           "frames": [], "close_code": None}
    for fin, op, rsv1, b64 in cfg["frames"]:
        sock.sendall(encode_frame(fin, op, rsv1, base64.b64decode(b64), True))
    try:
        while True:
            fin, op, rsv1, payload, buf = read_frame(sock, buf)
            out["frames"].append([fin, op, rsv1, base64.b64encode(payload).decode()])
            if op == 8:
                out["close_code"] = struct.unpack(">H", payload[:2])[0] if payload else None
                sock.sendall(encode_frame(True, 8, False, payload[:2], True))
                break
    except (EOFError, OSError):
        pass
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    {"server": server, "client": client, "raw": raw}[sys.argv[1]](json.loads(sys.argv[2]))
