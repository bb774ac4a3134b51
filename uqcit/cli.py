"""The ``uqcit`` command line: the library's recipes, run in batch.

Every bad input ends the same way: one line ``uqcit: error: ...`` on stderr and exit status 2,
before any work starts where it can be checked up front (``uqcit.pipeline.preflight``). The
known failures are the workbench's own error types (``ConfigError``, ``PackageError`` and its
``SecurityError``, ``UsageError``, every ``OSError``: a missing file, a full disk, an unknown
model); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
from pathlib import Path

from uqcit.core.io import atomic_write

EXIT_USAGE = 2  # argparse's status for a bad command line; every known error exits with it too


class UsageError(ValueError):
    """Command-line options that do not fit together; the message says which."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``uqcit: error: ...``, no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"uqcit: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of windows >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 window (omit it for the full protocol), got {value}")
    return value


def _eval_config(args, recipe=None):
    from uqcit.stages.evaluate import EvalConfig

    base = (recipe.stage("eval") if recipe is not None else None) or EvalConfig()
    if getattr(args, "quick", None) is not None:
        base = base.replace(max_windows=args.quick)
    return base


def _load_recipe(name_or_path: str):
    """``load_recipe``, with a file that is not a recipe (binary, not UTF-8, JSON of another shape)
    reported as a ``ConfigError`` naming the file."""
    from uqcit.core.keys import ConfigError
    from uqcit.recipe import load_recipe

    try:
        return load_recipe(name_or_path)
    except ConfigError:
        raise
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe file {name_or_path!r} is not UTF-8 text (byte {exc.start}); a recipe is "
                          "a JSON file, e.g. `uqcit recipes uqcit-default > my.json`") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:  # JSON of another shape
        raise ConfigError(f"recipe file {name_or_path!r} is not a recipe ({type(exc).__name__}: {exc}); "
                          "see `uqcit recipes uqcit-default` for the form") from None


def _check_output_file(path: str | None, option: str) -> None:
    """A file the command writes at its end (``--json``): refuse up front what would fail there."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path!r} is a folder; give a file name")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path!r}: folder {str(parent)!r} is not writable")


def _target_state(out: Path) -> str:
    """What ``--out`` is before a run: ``missing``, ``empty`` (folder), ``package`` or ``other``."""
    from uqcit.package import METADATA_FILE

    if not os.path.lexists(out):
        return "missing"
    if out.is_dir() and not out.is_symlink():
        if (out / METADATA_FILE).is_file():
            return "package"
        return "other" if any(out.iterdir()) else "empty"
    return "package" if (out / METADATA_FILE).is_file() else "other"


def _remove_created(out: Path, before: str) -> None:
    """After a failed run: remove the package it wrote at ``out`` where there was none before.

    A package that was there before the run, or anything that is not a package, is left alone.
    """
    if before not in ("missing", "empty") or _target_state(out) != "package":
        return
    if out.is_symlink():
        out.unlink()
    else:
        shutil.rmtree(out)
    if before == "empty":
        out.mkdir()


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


def _compress_on_server(args) -> int:
    """``compress --server``: the same job run by a server (``uqcit serve``), its package downloaded."""
    from uqcit.client import run_remote
    from uqcit.pipeline import preflight

    if args.sign:
        raise UsageError("--sign names a local key; a server signs with its own key: use --server-sign")
    recipe = _load_recipe(args.recipe)
    _check_output_file(args.json, "--json")
    secret = _secret(args)
    if (args.encrypt or args.encode) and secret is None:
        raise UsageError("--encrypt/--encode need --secret-file or --passphrase-env")
    preflight(recipe, args.out)  # the local --out, before the job is sent; the server checks the rest
    report = run_remote(args.server, _env(args.api_key_env), args.model, recipe, args.out, quick=args.quick,
                        sign=args.server_sign, encrypt=args.encrypt, encode=args.encode, secret=secret,
                        progress=not args.no_progress)
    if args.json:
        atomic_write(args.json, (report.to_json() + "\n").encode())
    print(report.format_table())
    return 0


def cmd_compress(args) -> int:
    from uqcit.pipeline import preflight, run_job
    from uqcit.package.secure import ProtectConfig, load_signing_key
    from uqcit.stream.commands import check_device_option

    check_device_option(args)  # --device is for --stream
    if args.server:
        return _compress_on_server(args)
    if args.server_sign:
        raise UsageError("--server-sign needs --server URL")
    recipe = _load_recipe(args.recipe)
    if args.stream:
        from uqcit.stream.commands import run_streamed  # block by block, for models larger than memory
        return run_streamed(args, recipe)
    eval_config = _eval_config(args, recipe)
    _check_output_file(args.json, "--json")
    protect = ProtectConfig(encrypt=args.encrypt, encode=args.encode)
    secret = _secret(args)
    if protect.active and secret is None:
        raise UsageError("--encrypt/--encode need --secret-file or --passphrase-env")
    preflight(recipe, args.out, model_name=args.model)  # before the keys' KDF; run_job checks again
    signing_key = load_signing_key(args.sign, passphrase=_env(args.key_passphrase_env)) if args.sign else None
    out = Path(args.out)
    before = _target_state(out)
    # A run_job that fails leaves ``out`` as it was (it swaps the package in as its last step), so
    # only a failure after it returns can leave a package behind; and that package is this run's.
    # (Removing one on a failure inside run_job could remove a concurrent run's package.)
    report = run_job(args.model, recipe, out, eval_config=eval_config, progress=not args.no_progress,
                     signing_key=signing_key, protect=protect if protect.active else None, secret=secret)
    try:
        table = report.format_table()
        if args.json:
            atomic_write(args.json, (report.to_json() + "\n").encode())
    except BaseException:
        _remove_created(out, before)  # a failed run leaves no package where there was none
        raise
    print(table)
    return 0


def cmd_eval(args) -> int:
    import torch

    from uqcit.inputs.models import ModelNotFoundError, check_model_name, load_model
    from uqcit.package import PackageMetadata, load_package
    from uqcit.package.secure import load_public_key
    from uqcit.stages.evaluate import evaluate_many

    config = _eval_config(args)
    meta = PackageMetadata.read(args.package)  # a folder that is no package fails before any load
    ref_name = None if args.reference == "none" else (args.reference or meta.source_model)
    if ref_name is not None:
        try:
            check_model_name(ref_name)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"reference {exc} (--reference none evaluates without one)") from None
    secret = _secret(args)
    public_key = load_public_key(args.public_key) if args.public_key else None
    pkg = load_package(args.package, progress=not args.no_progress, secret=secret, public_key=public_key,
                       dtype=None if args.dtype == "float32" else getattr(torch, args.dtype))  # None: no .to()
    reference = load_model(ref_name, progress=not args.no_progress).model if ref_name else None
    res = evaluate_many({"package": pkg.model}, pkg.tokenizer, config,
                        reference=reference, progress=not args.no_progress)
    out = {"dtype": str(pkg.model.dtype).removeprefix("torch."), "package": res["package"].to_dict()}  # as loaded
    if reference is not None:
        out["reference"] = res["reference"].to_dict()
        print(res["reference"].summary())
    print(f"{res['package'].summary()}, computed in {out['dtype']}")
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
    ppl = _validation(path, "perplexity", ("reference_ppl", "package_ppl"))
    if ppl is not None:
        scope = "full protocol" if ppl.get("full_protocol") else f"quick, {ppl.get('windows')} window(s)"
        print(f"perplexity    reference {ppl['reference_ppl']:.3f} → package {ppl['package_ppl']:.3f} ({scope})")
    bench = _validation(path, "benchmarks", ("kl", "top1"))
    if bench is not None:
        print(f"KL / top-1    {bench['kl']:.4f} / {bench['top1']:.2f}%")
    if args.layers:
        print("modules:")
        for name, layer, level, fmt, tied_to in meta.module_rows():
            tied = f" (tied to {tied_to})" if tied_to else ""
            print(f"  {layer:>9}  L{level}  {fmt:<20} {name}{tied}")
    return 0


def _validation(package: Path, name: str, numbers: tuple[str, ...]) -> dict | None:
    """``validation/<name>.json`` when it holds every one of ``numbers`` (as numbers), else None
    (a package exported without evaluation); ``PackageError`` naming the file when it is not JSON."""
    from uqcit.package import PackageError
    from uqcit.package.format import read_json

    path = package / "validation" / f"{name}.json"
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise PackageError(f"{path}: expected a JSON object, got {type(data).__name__}; the package is corrupt")
    values = [data.get(key) for key in numbers]
    if all(v is None for v in values):
        return None
    for key, value in zip(numbers, values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PackageError(f"{path}: key {key!r} must be a finite number, got {value!r}; "
                               "the package is corrupt (re-evaluate it with `uqcit eval`)")
    return data


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
    from uqcit.package.secure import load_public_key, verify_manifest, verify_package

    if args.public_key is None:  # integrity only: every file against the package's SHA-256 manifest
        checked = verify_manifest(args.package)
        print(f"{args.package}: {len(checked)} files match the SHA-256 manifest "
              "(integrity, not origin: pass --public-key to check a signature)")
        return 0
    print(verify_package(args.package, load_public_key(args.public_key)).summary())
    return 0


def cmd_export(args) -> int:
    from uqcit.export.targets import export_to
    from uqcit.package import load_package
    from uqcit.package.secure import load_public_key

    out = Path(args.out)
    if os.path.lexists(out):
        raise UsageError(f"--out {args.out!r} already exists; give a new folder")
    if args.widen and args.to != "compressed-tensors":
        raise UsageError(f"--widen is for --to compressed-tensors, not --to {args.to}")
    pkg = load_package(args.package, progress=not args.no_progress, secret=_secret(args),
                       public_key=load_public_key(args.public_key) if args.public_key else None)
    print(export_to(pkg, args.to, out, widen=args.widen).summary)  # the lab's export panel runs it too
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
    p = _Parser(prog="uqcit", description="UQCIT Workbench: compress, evaluate and "
                                "inspect transformer language models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="run a recipe on a model, export the package, evaluate it",
                       description="Load a model, run the recipe's stages, export a package, load it "
                       "back and evaluate it against the uncompressed model; prints a table.")
    c.add_argument("--model", default="smollm2-135m", help="model name, Hugging Face id or local folder")
    c.add_argument("--recipe", default="uqcit-default", help="built-in recipe name or recipe JSON file")
    c.add_argument("--out", required=True, help="package folder to write: a new path, an empty folder or "
                   "a package (replaced atomically); never a file or another folder")
    c.add_argument("--quick", type=_positive_int, metavar="N",
                   help="evaluate on only N >= 1 windows (not the full protocol)")
    c.add_argument("--json", help="also write the report as JSON to this file")
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")
    c.add_argument("--sign", metavar="KEY", help="sign the package with this Ed25519 private key (PEM)")
    c.add_argument("--key-passphrase-env", metavar="VAR", help="environment variable holding the "
                   "passphrase of a passphrase-protected --sign key")
    c.add_argument("--encrypt", action="store_true", help="encrypt the weight files (AES-256-GCM) under the secret")
    c.add_argument("--encode", action="store_true", help="keyed signed-permutation encoding of the weights "
                   "(obfuscation, not encryption)")
    _secret_args(c)
    c.add_argument("--server", metavar="URL", help="run the job on a server (`uqcit serve`) instead of here; "
                   "the package is downloaded to --out")
    c.add_argument("--api-key-env", metavar="VAR", default="UQCIT_API_KEY", help="environment variable "
                   "holding the server's API key (default UQCIT_API_KEY; kept off the command line)")
    c.add_argument("--server-sign", action="store_true", help="with --server: sign with the server's key")
    from uqcit.stream.commands import add_arguments as add_stream_arguments  # --stream, --run-dir

    add_stream_arguments(c)
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="evaluate a package", description="Evaluate a package with the "
                       "protocol of docs/evaluation.md, against its source model unless --reference none.")
    e.add_argument("package")
    e.add_argument("--reference", help="reference model (default: the package's source model); 'none' to skip")
    e.add_argument("--quick", type=_positive_int, metavar="N",
                   help="evaluate on only N >= 1 windows (not the full protocol)")
    e.add_argument("--json", help="write the results as JSON to this file")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype of the package (default float32; the reference stays float32)")
    e.add_argument("--public-key", help="verify the package with this Ed25519 public key (PEM) first")
    _secret_args(e)
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("inspect", help="print a package's layers, bits, levels and measured figures as text",
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

    v = sub.add_parser("verify", help="check a package's files (and its signature)", description="Check "
                       "every file against the package's SHA-256 manifest and, with --public-key, the "
                       "manifest's Ed25519 signature; names any modified, missing or added file.")
    v.add_argument("package")
    v.add_argument("--public-key", help="the signer's public key (PEM); without it only integrity is checked")
    v.set_defaults(fn=cmd_verify)

    x = sub.add_parser("export", help="write a package for another runtime", description="Write a package "
                       "as a compressed-tensors checkpoint (transformers and vLLM run its integer codes), a "
                       "GGUF file for llama.cpp (DIR/model.gguf), or a float32 transformers checkpoint (hf).")
    x.add_argument("package")
    x.add_argument("--to", required=True, choices=("compressed-tensors", "gguf", "hf"), help="the target runtime's format")
    x.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist)")
    x.add_argument("--widen", action="store_true", help="compressed-tensors: store 2- and 3-bit codes in 4 bits (exact)")
    x.add_argument("--public-key", help="verify the package with this Ed25519 public key (PEM) first")
    x.add_argument("--no-progress", action="store_true")
    _secret_args(x)
    x.set_defaults(fn=cmd_export)

    f = sub.add_parser("fetch-data", help="download the evaluation corpus (gensim wheel from PyPI)",
                       description="Extract lee_background.cor and lee.cor from gensim's wheel.")
    f.set_defaults(fn=cmd_fetch_data)

    r = sub.add_parser("recipes", help="list built-in recipes, or print one",
                       description="List the built-in recipes, or print one as JSON.")
    r.add_argument("name", nargs="?")
    r.set_defaults(fn=cmd_recipes)

    from uqcit.server.commands import add_parsers as add_server_parsers  # serve, serve-key

    add_server_parsers(sub)
    from uqcit.validation.commands import add_parsers as add_report_parser  # report

    add_report_parser(sub)
    return p


def _subject(args) -> str | None:
    """The path a command reads or writes, for an error that names no file."""
    return getattr(args, "out", None) or getattr(args, "package", None)


def error_line(exc: BaseException, subject: str | None = None) -> str:
    """One line for a known error: the message with its line breaks folded, the file named.

    >>> error_line(OSError(errno.ENOSPC, "No space left on device", "/pkg/layers/x.safetensors"))
    "No space left on device: '/pkg/layers/x.safetensors'"
    >>> error_line(OSError(errno.ENOSPC, "No space left on device"), "/pkg")
    "No space left on device (while writing or reading '/pkg')"
    """
    if isinstance(exc, OSError) and exc.strerror and exc.args[1:2] == (exc.strerror,):
        text = exc.strerror  # built as OSError(errno, strerror[, filename]): name the file plainly
        if exc.filename is not None:
            text += f": {str(exc.filename)!r}" + (f" -> {str(exc.filename2)!r}" if exc.filename2 else "")
        elif subject:
            text += f" (while writing or reading {subject!r})"
    else:
        text = str(exc) or type(exc).__name__
        if _is_safetensors_error(exc) and subject:
            text = f"{subject!r}: safetensors: {text}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _is_safetensors_error(exc: BaseException) -> bool:
    from safetensors import SafetensorError  # raised by the Rust core (a full disk names no file)

    return isinstance(exc, SafetensorError)


def _known_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    from uqcit.client import ServerError  # compress --server: the server's one-line refusal
    from uqcit.core.keys import ConfigError
    from uqcit.inputs.corpus import NotEnoughTextError
    from uqcit.package import PackageError  # SecurityError is one

    return (ConfigError, PackageError, UsageError, NotEnoughTextError, OSError, SafetensorError, ServerError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's first parallel region
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _known_errors() as exc:
        print(f"uqcit: error: {error_line(exc, _subject(args))}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
