"""The server's commands: ``uqcit serve`` and ``uqcit serve-key`` (``uqcit.cli`` adds them).

``serve`` binds its socket itself, so ``--port 0`` takes any free port and the first line on
stdout says which (``uqcit: serving http://127.0.0.1:PORT ...``): what tests and scripts read.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from uqcit.core.io import write_json

DEFAULT_PORT = 8765


def add_parsers(sub) -> None:
    """Add ``serve`` and ``serve-key`` to the ``uqcit`` command's subparsers."""
    s = sub.add_parser("serve", help="run the REST API server (jobs over HTTP)",
                       description="Serve the REST API (docs/server.md): jobs run the same run_job as "
                       "`uqcit compress`, at most --max-jobs at a time. Clients need a key from "
                       "`uqcit serve-key create`.")
    s.add_argument("--data", help="the server's folder: database, jobs, packages, uploaded models (created)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; put a "
                   "TLS reverse proxy in front before serving beyond this machine)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free "
                   "port, printed on the first line)")
    s.add_argument("--models", action="append", default=[], metavar="DIR", help="a folder whose model "
                   "sub-folders jobs may name by absolute path (repeatable; nothing else on disk is readable)")
    s.add_argument("--max-jobs", type=int, default=1, help="jobs run at once; more wait in the queue (default 1)")
    s.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest model upload, MiB (default 2048)")
    s.add_argument("--job-threads", type=int, help="torch threads per job (default: the cores / --max-jobs)")
    s.add_argument("--sign-key", metavar="KEY", help="Ed25519 private key (PEM) that signs packages of jobs "
                   "asking for it (options.sign)")
    s.add_argument("--sign-key-passphrase-env", metavar="VAR", help="environment variable holding the "
                   "passphrase of a passphrase-protected --sign-key")
    s.add_argument("--openapi", metavar="FILE", help="write the API's OpenAPI schema to FILE and exit "
                   "(the committed copy is docs/openapi.json)")
    s.set_defaults(fn=cmd_serve, parser=s)

    k = sub.add_parser("serve-key", help="create, list or revoke the server's API keys",
                       description="API keys of a server's data folder. A key is printed once, at "
                       "creation; the server stores only its SHA-256 hash.")
    actions = k.add_subparsers(dest="action", required=True)
    c = actions.add_parser("create", help="create a key and print it (once)")
    c.add_argument("--name", required=True, help="who or what the key is for (shown by list)")
    lst = actions.add_parser("list", help="list keys (id, name, prefix, created, revoked)")
    r = actions.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id", type=int)
    for p in (c, lst, r):
        p.add_argument("--data", required=True, help="the server's data folder (as given to `uqcit serve`)")
    k.set_defaults(fn=cmd_serve_key, parser=k)


def _settings(args):
    from uqcit.server.settings import MiB, ServerSettings

    for folder in args.models:
        if not Path(folder).is_dir():
            raise NotADirectoryError(f"--models {folder!r} is not a folder")
    return ServerSettings(data=Path(args.data), model_dirs=tuple(Path(d) for d in args.models),
                          max_jobs=args.max_jobs, max_upload_bytes=max(1, int(args.max_upload_mb * MiB)),
                          sign_key=Path(args.sign_key) if args.sign_key else None,
                          sign_key_passphrase_env=args.sign_key_passphrase_env, job_threads=args.job_threads)


def cmd_serve(args) -> int:
    if args.openapi:
        from uqcit.server.app import openapi_schema

        write_json(args.openapi, openapi_schema())
        print(f"wrote {args.openapi}")
        return 0
    # args.parser.error: the CLI's one-line usage error (exit 2), without importing the CLI
    if not args.data:
        args.parser.error("serve needs --data DIR (the server's folder), or --openapi FILE")
    if args.max_jobs < 1:
        args.parser.error(f"--max-jobs must be >= 1, got {args.max_jobs}")
    settings = _settings(args)
    from uqcit.server.jobs import start_fork_server

    start_fork_server()  # its imports (seconds) overlap the server's own start
    if settings.sign_key is not None:  # fail now, not in the first signed job
        from uqcit.package.secure import load_signing_key

        env = settings.sign_key_passphrase_env
        load_signing_key(settings.sign_key, passphrase=os.environ.get(env) if env else None)
    settings.prepare()
    from uqcit.server.db import JobStore

    JobStore(settings.db_path).close()  # creates or migrates the database; refuses a newer one
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections wait in the backlog from now on, until the app starts answering
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"uqcit: serving http://{shown}:{port} (data {settings.data}, at most {settings.max_jobs} "
          "job(s) at a time)", flush=True)
    from uqcit.server.app import create_app

    config = uvicorn.Config(create_app(settings), log_level="info", timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def cmd_serve_key(args) -> int:
    import datetime

    from uqcit.server.auth import create_key
    from uqcit.server.db import JobStore
    from uqcit.server.settings import ServerSettings

    settings = ServerSettings(data=Path(args.data))
    settings.prepare()
    store = JobStore(settings.db_path)
    try:
        if args.action == "create":
            key_id, key = create_key(store, args.name)
            print(key)
            print(f"key {key_id} ({args.name}) created; it is shown only now: the server keeps its hash. "
                  "Clients send it in the X-API-Key header (uqcit compress --server reads UQCIT_API_KEY).",
                  file=sys.stderr)
        elif args.action == "list":
            for k in store.keys():
                when = datetime.datetime.fromtimestamp(k["created_at"]).isoformat(timespec="seconds")
                state = "revoked" if k["revoked_at"] else "live"
                print(f"{k['id']:>4}  {k['prefix']}…  {state:7}  {when}  {k['name']}")
        elif not store.revoke_key(args.id):
            args.parser.error(f"no live key with id {args.id} (see `uqcit serve-key list --data {args.data}`)")
        else:
            print(f"key {args.id} revoked")
    finally:
        store.close()
    return 0
