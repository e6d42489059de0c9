"""``tilefleet serve`` and ``tilefleet loadtest``: argument parsing, lines and tables around
:mod:`fleet.serving` (which does the work and prints nothing)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

SERVE_EPILOG = """\
examples:
  tilefleet serve --devices pi3*4 --model yolov2-16             one model on 4 emulated Pi 3s
  tilefleet serve --devices pi4*2 --repository models/         every model folder under models/
  tilefleet serve --cluster lab --repository models/ --host 0.0.0.0 --auth-token-file token
  tilefleet serve --address auto --model net.cfg --tls-cert cert.pem --tls-key key.pem

The server speaks the Open Inference Protocol (KServe v2) on --port (HTTP) and --grpc-port
(gRPC), e.g. with tritonclient.http / tritonclient.grpc; GET /metrics for Prometheus.
See docs/serving.md.
"""

LOADTEST_EPILOG = """\
examples:
  tilefleet loadtest http://127.0.0.1:8000 --model yolov2-16 --rate 1,2,4 --duration 30 --plot lat.png
  tilefleet loadtest http://127.0.0.1:8000 --model yolov2-16 --rate 3 --poisson --duration 60 --json out.json
  tilefleet loadtest http://127.0.0.1:8000 --model yolov2-16 --concurrency 8 --duration 30
"""


def add_commands(sub: Any) -> None:
    s = sub.add_parser("serve", help="serve models on the fleet over the Open Inference Protocol (HTTP and gRPC)",
                       description="Deploy one model (--model) or a model repository (--repository) on a cluster "
                                   "and serve it with the KServe v2 / Triton protocol on HTTP and gRPC, with "
                                   "Prometheus metrics at /metrics.",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a zoo model name (tilefleet models) or a model file: Darknet .cfg, .onnx, "
                                     "TorchScript .pt (served under its stem)")
    src.add_argument("--repository", help="a folder with one sub-folder (and config.toml) per model")
    s.add_argument("--size", type=int, help="with --model: input height and width (default: the model's own)")
    s.add_argument("--grid", default="auto", help="with --model: ROWSxCOLS, or auto")
    s.add_argument("--mode", choices=["latency", "throughput"], default="latency", help="with --model: what auto optimises")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--devices", default="pi3*4", help="emulated devices, 'profile*count,...' (default: %(default)s)")
    where.add_argument("--address", help="an existing Ray cluster ('auto' or ray://host:10001)")
    where.add_argument("--cluster", help="a LAN cluster by name (tilefleet head --name NAME), found by zeroconf")
    s.add_argument("--token-file", help="with --cluster: the LAN join token (default ~/.config/tilefleet/token)")
    s.add_argument("--profiles", help="a TOML file of custom device profiles (with --devices)")
    s.add_argument("--scale", type=float, help="emulation clock scale")
    s.add_argument("--host", default="127.0.0.1", help="address to bind both ports to (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    s.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: %(default)s; -1 turns gRPC off)")
    s.add_argument("--auth-token-file", help="require 'Authorization: Bearer TOKEN' (this file's content) on both ports")
    s.add_argument("--tls-cert", help="TLS certificate (PEM) for both ports")
    s.add_argument("--tls-key", help="TLS private key (PEM) for both ports")
    s.add_argument("--insecure", action="store_true", help="allow a non-localhost --host without a token")
    s.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest request body (default: 64 MiB)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take, queue included")
    s.add_argument("--in-flight-per-device", type=int, default=2, help="frames in the fleet at once, per alive device")
    s.add_argument("--max-queue", type=int, default=256, help="requests that may wait; more get 503")
    s.set_defaults(func=serve)

    lt = sub.add_parser("loadtest", help="measure a server's latency and throughput (open or closed loop)",
                        description="Send binary-tensor inference requests to an Open Inference Protocol server. "
                                    "--rate: open loop, requests leave on schedule regardless of earlier ones and "
                                    "latency counts from the scheduled send (no coordinated omission); "
                                    "--concurrency: closed loop with N clients.",
                        epilog=LOADTEST_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    lt.add_argument("url", help="the server's HTTP address, e.g. http://127.0.0.1:8000")
    lt.add_argument("--model", required=True, help="model name")
    how = lt.add_mutually_exclusive_group(required=True)
    how.add_argument("--rate", help="offered requests per second; several comma-separated for a sweep")
    how.add_argument("--concurrency", type=int, help="closed loop: clients each with one request at a time")
    lt.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals instead of even spacing")
    lt.add_argument("--duration", type=float, default=10.0, help="seconds per rate (default: %(default)s)")
    lt.add_argument("--batch", type=int, default=1, help="frames per request")
    lt.add_argument("--auth-token-file", help="send this file's token as a bearer token")
    lt.add_argument("--ca-cert", help="trust this certificate (PEM) for https")
    lt.add_argument("--json", help="write the results as JSON here")
    lt.add_argument("--plot", help="plot latency against offered load to this PNG (needs matplotlib)")
    lt.set_defaults(func=loadtest)


def _configs(args: argparse.Namespace) -> tuple[dict[str, Any], Path | None]:
    from fleet.serving import repository as repo

    if args.repository:
        root = Path(args.repository)
        return repo.scan(root), root
    grid = args.grid.lower()
    shape = (3, args.size, args.size) if args.size else None
    cfg = repo.single(args.model, grid=grid, mode=args.mode, input_shape=shape)
    return {cfg.name: cfg}, None


def serve(args: argparse.Namespace) -> int:
    import fleet
    from fleet.serving.security import SecurityError
    from fleet.serving.server import ServeOptions, Server
    from fleet.serving.service import ServiceOptions

    opts = ServeOptions(host=args.host, port=args.port, grpc_port=None if args.grpc_port < 0 else args.grpc_port,
                        token_file=args.auth_token_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        insecure=args.insecure, max_request_bytes=args.max_request_bytes,
                        service=ServiceOptions(per_device_in_flight=args.in_flight_per_device,
                                               max_queue=args.max_queue, timeout_s=args.timeout))
    try:
        opts.security()  # before minutes of cluster start-up, not after
        configs, root = _configs(args)
    except (SecurityError, ValueError) as e:
        print(f"tilefleet serve: error: {e}", file=sys.stderr)
        return 2
    where = args.cluster or args.address or args.devices
    print(f"tilefleet serve: connecting to {where} ...")
    kw: dict[str, Any] = ({"cluster": args.cluster, "token_file": args.token_file} if args.cluster else
                          {} if args.address else {"emulate": args.devices, "profiles_file": args.profiles,
                                                   "scale": args.scale})
    with fleet.connect(args.address, **kw) as cluster:
        print(f"  {len(cluster.devices())} devices")
        server = Server(cluster, configs, opts, repository_dir=root, version=_version()).start()
        print(f"  HTTP {server.url}" + (f", gRPC {server.grpc_address}" if server.grpc_port else "")
              + (", bearer token required" if server.security.token else "") + (", TLS" if server.security.tls else ""))
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job may start with it ignored
            signal.signal(sig, lambda *_: stop.set())
        try:
            for name, state in server.service.load_startup().items():
                print(f"  model {name}: {state}")
            print("serving; Ctrl-C to stop")
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            print("stopping ...")
            server.stop()
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tilefleet")
    except PackageNotFoundError:
        return "0"


def loadtest(args: argparse.Namespace) -> int:
    import ssl

    from fleet.serving import loadtest as lt
    from fleet.serving.security import read_token
    from tiling.report import table

    token = read_token(args.auth_token_file) if args.auth_token_file else None
    verify: Any = ssl.create_default_context(cafile=args.ca_cert) if args.ca_cert else True
    target = lt.prepare(args.url, args.model, token, verify, batch=args.batch)
    rates = [float(r) for r in args.rate.split(",")] if args.rate else []
    loop = f"closed loop, {args.concurrency} clients" if args.concurrency else \
        f"open loop, {'Poisson' if args.poisson else 'even'} arrivals"
    print(f"tilefleet loadtest: {args.url} model {args.model}, {loop}, {args.duration:g} s each")
    reports = lt.run(target, rates=rates, concurrency=args.concurrency, duration=args.duration, poisson=args.poisson)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows = [[f"{r['offered_rps']:g}" if r["offered_rps"] else f"c={r.get('concurrency')}", r["sent"], r["ok"],
             f"{r['achieved_rps']:.2f}", ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]), ms(r["max_ms"]),
             ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"] for r in reports]
    print(table(["offered/s", "sent", "ok", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"], rows))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(reports, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        if len(reports) < 2 or not rates:
            print("--plot needs several --rate values (a sweep); skipped", file=sys.stderr)
        else:
            try:
                lt.plot(reports, args.plot, f"{args.model} at {args.url}")
                print(f"wrote {args.plot}")
            except ImportError as e:
                print(f"tilefleet loadtest: {e}", file=sys.stderr)
                return 1
    return 0 if all(r["ok"] for r in reports) else 1
