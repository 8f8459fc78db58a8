"""A real gRPC server and client (grpcio, C-core) for veer's L7 tests.

No generated code: generic handlers on raw bytes, so the test needs no
protoc. Service /veer.test.Echo:
  Unary(bytes) -> b"unary:" + bytes, with trailing metadata x-veer-trailer=ok
  Stream(stream bytes) -> the same messages back, one by one (bidi)
  Fail(bytes) -> status NOT_FOUND with details "no such thing"

  peer.py serve ADDR          # h2c server; prints "listening" once bound
  peer.py call TARGET N       # unary, then a bidi stream of N messages and a
                              # failing call; prints what it checked; exit 1
                              # on any mismatch
"""
import sys
from concurrent import futures

import grpc


def unary(request, context):
    context.set_trailing_metadata((("x-veer-trailer", "ok"),))
    return b"unary:" + request


def stream(request_iterator, context):
    for m in request_iterator:
        yield m


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def serve(addr):
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("veer.test.Echo", handlers),)
    )
    server.add_insecure_port(addr)
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def call(target, n):
    ch = grpc.insecure_channel(target)
    grpc.channel_ready_future(ch).result(timeout=10)
    u = ch.unary_unary("/veer.test.Echo/Unary")
    resp, c = u.with_call(b"hello", timeout=10)
    assert resp == b"unary:hello", resp
    trailers = dict(c.trailing_metadata())
    assert trailers.get("x-veer-trailer") == "ok", trailers
    print("unary ok, trailer ok")
    s = ch.stream_stream("/veer.test.Echo/Stream")
    msgs = [("m%d" % i).encode() * 100 for i in range(n)]
    got = list(s(iter(msgs), timeout=20))
    assert got == msgs, (len(got), len(msgs))
    print("stream ok: %d messages" % len(got))
    f = ch.unary_unary("/veer.test.Echo/Fail")
    try:
        f(b"x", timeout=10)
        raise AssertionError("Fail succeeded")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e.code()
        assert e.details() == "no such thing", e.details()
    print("status ok: NOT_FOUND")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        call(sys.argv[2], int(sys.argv[3]))
