"""`llmstack keys`: named API keys for `llmstack serve` (add, revoke, list)."""
from __future__ import annotations

DEFAULT_FILE = "deploy/secrets/keys.yaml"


def run(args) -> int:
    from serving import keys

    if args.action == "add":
        key = keys.add_key(args.file, args.name, args.requests_per_min, args.tokens_per_min, args.admin)
        print(f"key '{args.name}' added to {args.file}; the key (shown only now, store it safely):\n{key}")
    elif args.action == "revoke":
        keys.revoke_key(args.file, args.name)
        print(f"key '{args.name}' revoked in {args.file}; a running server refuses it within a second")
    else:
        found = keys.read_keys(args.file).values()
        for k in sorted(found, key=lambda k: k.name):
            role = "\tadmin" if k.admin else ""
            print(f"{k.name}\trequests/min {k.requests_per_min or '-'}\ttokens/min {k.tokens_per_min or '-'}{role}")
    return 0


def register(sub) -> None:
    k = sub.add_parser("keys", help="named API keys for the server: add, revoke, list",
                       description="Manage the keys file `llmstack serve` reads (auth.keys_file): each key has a name, "
                       "the SHA-256 of the key (never the key) and optional limits. A running server re-reads the "
                       "file when it changes. Serve with: llmstack serve auth.keys_file=FILE [auth.audit_log=FILE].")
    k.add_argument("action", choices=("add", "revoke", "list"), help="add: make a key and print it once; revoke: "
                   "remove it; list: names and limits")
    k.add_argument("name", nargs="?", help="the key's name (add, revoke): what /metrics and the audit log show")
    k.add_argument("--file", default=DEFAULT_FILE, help="the keys file (default: %(default)s)")
    k.add_argument("--requests-per-min", type=int, help="add: requests per minute this key may make (429 beyond)")
    k.add_argument("--tokens-per-min", type=int, help="add: prompt + completion tokens per minute (429 beyond)")
    k.add_argument("--admin", action="store_true", help="add: the key may also call the admin routes (POST "
                   "/admin/reload: swap the served model; `llmstack reload`)")
    k.set_defaults(func=_checked)


def _checked(args) -> int:
    import argparse
    if args.action in ("add", "revoke") and not args.name:
        raise SystemExit(argparse.ArgumentParser(prog="llmstack keys").error(f"{args.action} needs a NAME"))
    for opt in ("requests_per_min", "tokens_per_min"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise SystemExit(argparse.ArgumentParser(prog="llmstack keys").error(
                f"--{opt.replace('_', '-')} must be at least 1, got {v}"))
    return run(args)
