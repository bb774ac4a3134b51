"""The ``uqcit`` command line: the library's recipes, run in batch."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from uqcit.core.io import atomic_write


def _eval_config(args, recipe=None):
    from uqcit.stages.evaluate import EvalConfig

    base = (recipe.stage("eval") if recipe is not None else None) or EvalConfig()
    if getattr(args, "quick", None):
        base = base.replace(max_windows=args.quick)
    return base


class UsageError(ValueError):
    """Command-line options that do not fit together; the message says which."""


def _secret(args):
    """The encryption/encoding secret named on the command line (a file, or a passphrase in an env var)."""
    from uqcit.package.secure import Secret

    if getattr(args, "secret_file", None) and getattr(args, "passphrase_env", None):
        raise UsageError("give --secret-file or --passphrase-env, not both")
    if getattr(args, "secret_file", None):
        return Secret.from_file(args.secret_file)
    if getattr(args, "passphrase_env", None):
        value = os.environ.get(args.passphrase_env)
        if not value:
            raise UsageError(f"environment variable {args.passphrase_env} is not set or empty")
        return Secret.from_passphrase(value)
    return None


def _env(name: str | None) -> str | None:
    if name and not os.environ.get(name):
        raise UsageError(f"environment variable {name} is not set or empty")
    return os.environ.get(name) if name else None


def cmd_compress(args) -> int:
    from uqcit.pipeline import run_job
    from uqcit.recipe import load_recipe
    from uqcit.package.secure import ProtectConfig, load_signing_key

    recipe = load_recipe(args.recipe)
    signing_key = (load_signing_key(args.sign, passphrase=_env(args.key_passphrase_env))
                   if args.sign else None)
    protect = ProtectConfig(encrypt=args.encrypt, encode=args.encode)
    secret = _secret(args)
    if protect.active and secret is None:
        raise UsageError("--encrypt/--encode need --secret-file or --passphrase-env")
    report = run_job(args.model, recipe, args.out, eval_config=_eval_config(args, recipe),
                     progress=not args.no_progress, signing_key=signing_key,
                     protect=protect if protect.active else None, secret=secret)
    print(report.format_table())
    if args.json:
        atomic_write(args.json, (report.to_json() + "\n").encode())
    return 0


def cmd_eval(args) -> int:
    from uqcit.stages.evaluate import evaluate_many
    from uqcit.inputs.models import load_model
    from uqcit.package import load_package

    from uqcit.package.secure import load_public_key

    pkg = load_package(args.package, progress=not args.no_progress, secret=_secret(args),
                       public_key=load_public_key(args.public_key) if args.public_key else None)
    reference = None
    if args.reference != "none":
        ref_name = args.reference or pkg.metadata.get("source_model")
        reference = load_model(ref_name, progress=not args.no_progress).model
    res = evaluate_many({"package": pkg.model}, pkg.tokenizer, _eval_config(args),
                        reference=reference, progress=not args.no_progress)
    out = {"package": res["package"].to_dict()}
    if reference is not None:
        out["reference"] = res["reference"].to_dict()
        print(res["reference"].summary())
    print(res["package"].summary())
    if args.json:
        atomic_write(args.json, (json.dumps(out, indent=2) + "\n").encode())
    return 0


def cmd_inspect(args) -> int:
    from uqcit.package import PackageMetadata, package_bytes

    path = Path(args.package)
    meta = PackageMetadata.read(path)
    print(f"package       {path}")
    print(f"source model  {meta.source_model}")
    print(f"method        {meta.method}")
    print(f"bits/weight   {meta.average_bits_per_param:.3f} over {meta.quantized_weight_count:,} quantized weights")
    print(f"package bytes {package_bytes(path):,}")
    if meta.signed_by:
        print(f"signed        ed25519, key {meta.signed_by[:16]} "
              "(not verified here: uqcit verify --public-key)")
    if meta.protection:
        print(f"protection    {' + '.join(meta.protected)} (key from {meta.key_derivation}; loading needs the secret)")
    print("levels:")
    for lvl, percent, avg_bits in meta.levels():
        print(f"  {lvl}: {percent:.1f}% of weights, {avg_bits:.3f} bits/weight")
    vdir = path / "validation"
    for name in ("perplexity", "benchmarks"):
        f = vdir / f"{name}.json"
        if f.is_file():
            data = json.loads(f.read_text())
            if name == "perplexity" and data.get("reference_ppl") is not None:
                scope = "full protocol" if data.get("full_protocol") else f"quick, {data.get('windows')} window(s)"
                print(f"perplexity    reference {data['reference_ppl']:.3f} → package {data['package_ppl']:.3f} ({scope})")
            if name == "benchmarks" and data.get("kl") is not None:
                print(f"KL / top-1    {data['kl']:.4f} / {data['top1']:.2f}%")
    if args.layers:
        print("modules:")
        for name, layer, level, fmt, tied_to in meta.module_rows():
            tied = f" (tied to {tied_to})" if tied_to else ""
            print(f"  {layer:>9}  L{level}  {fmt:<20} {name}{tied}")
    return 0


def cmd_keygen(args) -> int:
    from uqcit.package.secure import Secret, fingerprint, keygen, load_public_key

    priv, pub = keygen(args.out, args.name, passphrase=_env(args.passphrase_env))
    print(f"private key  {priv}  (keep it secret; signs packages)")
    print(f"public key   {pub}  (share it; verifies packages)")
    print(f"fingerprint  {fingerprint(load_public_key(pub))}")
    if args.secret:
        path = Path(args.out) / f"{args.name}.secret"
        if path.exists():
            raise FileExistsError(f"{path} exists; keygen never overwrites a key")
        Secret.generate().save(path)
        print(f"secret       {path}  (32 random bytes for --encrypt/--encode; never stored in a package)")
    return 0


def cmd_verify(args) -> int:
    from uqcit.package.secure import load_public_key, verify_package

    print(verify_package(args.package, load_public_key(args.public_key)).summary())
    return 0


def _secret_args(parser) -> None:
    parser.add_argument("--secret-file", help="file with the 32-byte secret (hex) of an encrypted/encoded package")
    parser.add_argument("--passphrase-env", metavar="VAR",
                        help="environment variable holding the passphrase (kept off the command line)")


def cmd_fetch_data(args) -> int:
    from uqcit.inputs.corpus import fetch_corpora

    for p in fetch_corpora():
        print(p)
    return 0


def cmd_recipes(args) -> int:
    from uqcit.recipe import builtin_recipe, builtin_recipes

    if args.name:
        print(builtin_recipe(args.name).to_json())
    else:
        for n in builtin_recipes():
            print(f"{n:28} {builtin_recipe(n).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uqcit", description="UQCIT Workbench: compress, evaluate and "
                                "inspect transformer language models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="run a recipe on a model, export the package, evaluate it",
                       description="Load a model, run the recipe's stages, export a package, load it "
                       "back and evaluate it against the uncompressed model; prints a table.")
    c.add_argument("--model", default="smollm2-135m", help="model name, Hugging Face id or local folder")
    c.add_argument("--recipe", default="uqcit-default", help="built-in recipe name or recipe JSON file")
    c.add_argument("--out", required=True, help="package folder to write (replaced atomically)")
    c.add_argument("--quick", type=int, metavar="N", help="evaluate on only N windows (not the full protocol)")
    c.add_argument("--json", help="also write the report as JSON to this file")
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")
    c.add_argument("--sign", metavar="KEY", help="sign the package with this Ed25519 private key (PEM)")
    c.add_argument("--key-passphrase-env", metavar="VAR", help="environment variable holding the "
                   "passphrase of a passphrase-protected --sign key")
    c.add_argument("--encrypt", action="store_true", help="encrypt the weight files (AES-256-GCM) under the secret")
    c.add_argument("--encode", action="store_true", help="keyed signed-permutation encoding of the weights "
                   "(obfuscation, not encryption)")
    _secret_args(c)
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="evaluate a package", description="Evaluate a package with the "
                       "protocol of docs/evaluation.md, against its source model unless --reference none.")
    e.add_argument("package")
    e.add_argument("--reference", help="reference model (default: the package's source model); 'none' to skip")
    e.add_argument("--quick", type=int, metavar="N", help="evaluate on only N windows (not the full protocol)")
    e.add_argument("--json", help="write the results as JSON to this file")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--public-key", help="verify the package with this Ed25519 public key (PEM) first")
    _secret_args(e)
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("inspect", help="print a package's layers, bits, levels and figures",
                       description="Read a package's metadata and validation files (no weights loaded).")
    i.add_argument("package")
    i.add_argument("--layers", action="store_true", help="list every module with its level and format")
    i.set_defaults(fn=cmd_inspect)

    k = sub.add_parser("keygen", help="create an Ed25519 key pair for signing packages",
                       description="Write NAME.key (private, mode 0600) and NAME.pub in --out; with "
                       "--secret also NAME.secret (32 random bytes) for --encrypt/--encode.")
    k.add_argument("--out", required=True, help="folder for the key files (never overwritten)")
    k.add_argument("--name", default="uqcit")
    k.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private key with the passphrase "
                   "in this environment variable")
    k.add_argument("--secret", action="store_true", help="also write a random secret file")
    k.set_defaults(fn=cmd_keygen)

    v = sub.add_parser("verify", help="verify a signed package", description="Check the package's "
                       "Ed25519 signature and every file against its signed manifest; names any "
                       "modified, missing or added file.")
    v.add_argument("package")
    v.add_argument("--public-key", required=True, help="the signer's public key (PEM)")
    v.set_defaults(fn=cmd_verify)

    f = sub.add_parser("fetch-data", help="download the evaluation corpus (gensim wheel from PyPI)",
                       description="Extract lee_background.cor and lee.cor from gensim's wheel.")
    f.set_defaults(fn=cmd_fetch_data)

    r = sub.add_parser("recipes", help="list built-in recipes, or print one",
                       description="List the built-in recipes, or print one as JSON.")
    r.add_argument("name", nargs="?")
    r.set_defaults(fn=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's first parallel region
    args = build_parser().parse_args(argv)
    from uqcit.core.config import ConfigError
    from uqcit.package import PackageError

    try:
        return args.fn(args)
    except (ConfigError, PackageError, UsageError, FileNotFoundError, FileExistsError) as exc:
        print(f"uqcit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
