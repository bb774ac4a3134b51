import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from uqcit.package import secure
from uqcit.stages.quantize import quantize_model
from uqcit.core.config import ConfigError, StageConfig
from uqcit.stages.levels import analyze_levels
from uqcit.package import PackageError, export_package, load_package, package_bytes, read_metadata, write_validation
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.package.secure import ProtectConfig, Secret, SecurityError
from uqcit.inputs.tiny import tiny_model

FAST = ProtectConfig(encrypt=True, encode=True, scrypt_log2_n=10)  # cheap scrypt for tests only


@pytest.fixture(scope="module")
def quantized():
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    # a mixed format (masks, high-precision codes) and plain ones, so every tensor kind is exercised
    plan = build_plan(levels, PlanConfig(preset="binary-concentration", group_size=32))
    return quantize_model(model, levels, plan, progress=False), tok


@pytest.fixture(scope="module")
def key():
    return secure.generate_signing_key()


@pytest.fixture(scope="module")
def signed_pkg(quantized, key, tmp_path_factory):
    q, tok = quantized
    return export_package(q, tok, tmp_path_factory.mktemp("signed") / "pkg", signing_key=key)


def _ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_keys_round_trip_through_pem(tmp_path, key):
    priv, pub = secure.keygen(tmp_path, "k", passphrase="pw")
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    assert b"ENCRYPTED PRIVATE KEY" in priv.read_bytes()
    loaded = secure.load_signing_key(priv, passphrase="pw")
    assert secure.fingerprint(loaded) == secure.fingerprint(secure.load_public_key(pub))
    with pytest.raises(SecurityError, match="passphrase"):
        secure.load_signing_key(priv)
    with pytest.raises(FileExistsError):
        secure.keygen(tmp_path, "k")
    with pytest.raises(SecurityError, match="public key"):
        secure.load_public_key(priv)


def test_signed_package_verifies_and_loads_the_same_model(signed_pkg, quantized, key):
    res = secure.verify_package(signed_pkg, key.public_key())
    covered = set(res.files)
    assert covered == set(_files(signed_pkg)) - {secure.MANIFEST_FILE, secure.SIGNATURE_FILE}
    assert read_metadata(signed_pkg)["package_bytes"] == package_bytes(signed_pkg)
    assert read_metadata(signed_pkg)["signature"]["public_key_sha256"] == secure.fingerprint(key)
    loaded = load_package(signed_pkg, progress=False, public_key=key.public_key())
    assert torch.equal(_logits(loaded.model), _logits(quantized[0].model))


def test_flipping_any_single_byte_of_any_file_is_detected(signed_pkg, key, tmp_path):
    files = _files(signed_pkg)
    assert len(files) > 20
    for rel in files:
        pkg = tmp_path / "t"
        shutil.copytree(signed_pkg, pkg)
        data = bytearray((pkg / rel).read_bytes())
        for pos in sorted({0, len(data) // 2, len(data) - 1}):  # start, middle, end of each file
            flipped = bytearray(data)
            flipped[pos] ^= 0x01  # one bit: the smallest change there is
            (pkg / rel).write_bytes(bytes(flipped))
            with pytest.raises(SecurityError) as err:
                secure.verify_package(pkg, key.public_key())
            named = secure.SIGNATURE_FILE if rel in (secure.MANIFEST_FILE, secure.SIGNATURE_FILE) else rel
            assert err.value.problems[0][0] == named, (rel, pos)
            assert named in str(err.value)
        shutil.rmtree(pkg)


def test_added_removed_and_renamed_files_and_wrong_key_are_refused(signed_pkg, key, tmp_path):
    pkg = tmp_path / "p"
    shutil.copytree(signed_pkg, pkg)
    (pkg / "layers" / "outer" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(SecurityError, match="extra.safetensors: added after signing"):
        load_package(pkg, progress=False, public_key=key.public_key())
    (pkg / "layers" / "outer" / "extra.safetensors").unlink()
    (pkg / "validation" / "noise_profile.json").unlink()
    with pytest.raises(SecurityError, match="noise_profile.json: missing"):
        secure.verify_package(pkg, key.public_key())
    shutil.rmtree(pkg)
    shutil.copytree(signed_pkg, pkg)
    os.replace(pkg / "layers" / "layer_001", pkg / "layers" / "layer_009")
    with pytest.raises(SecurityError) as err:
        secure.verify_package(pkg, key.public_key())
    kinds = {what.split(" ")[0] for _, what in err.value.problems}
    assert kinds == {"added", "missing"}
    other = secure.generate_signing_key()
    with pytest.raises(SecurityError, match="another key"):
        secure.verify_package(signed_pkg, other.public_key())
    (pkg / secure.SIGNATURE_FILE).unlink()
    with pytest.raises(SecurityError, match="not signed"):
        load_package(pkg, progress=False, public_key=key.public_key())


def test_write_validation_re_signs_only_with_the_key_and_only_an_intact_package(signed_pkg, key, tmp_path):
    pkg = tmp_path / "p"
    shutil.copytree(signed_pkg, pkg)
    with pytest.raises(PackageError, match="signed"):
        write_validation(pkg, "perplexity", {"ppl": 1.0})
    assert json.loads((pkg / "validation" / "perplexity.json").read_text()) == {"measured": False}
    write_validation(pkg, "perplexity", {"ppl": 1.0}, signing_key=key)
    secure.verify_package(pkg, key.public_key())
    assert read_metadata(pkg)["package_bytes"] == package_bytes(pkg)
    (pkg / "config.json").write_text((pkg / "config.json").read_text().replace("llama", "llamb"))
    with pytest.raises(SecurityError, match="config.json: modified"):
        write_validation(pkg, "benchmarks", {"kl": 0.0}, signing_key=key)  # never launder tampering


@pytest.fixture(scope="module")
def protected(quantized, key, tmp_path_factory):
    q, tok = quantized
    secret = Secret.from_passphrase("correct horse battery staple")
    path = export_package(q, tok, tmp_path_factory.mktemp("prot") / "pkg", signing_key=key,
                          protect=FAST, secret=secret)
    return path, secret


def test_encrypted_encoded_package_round_trips_exactly(protected, quantized, key):
    path, secret = protected
    weights = [f for f in _files(path) if "weights.safetensors" in f]
    assert weights and all(f.endswith(".enc") for f in weights)
    loaded = load_package(path, progress=False, public_key=key.public_key(), secret=secret)
    assert torch.equal(_logits(loaded.model), _logits(quantized[0].model))
    meta = read_metadata(path)
    assert meta["protection"]["encoding"]["scheme"] == secure.ENCODING_SCHEME
    assert ProtectConfig.from_dict(meta["protection"]["config"]) == FAST


def test_secret_is_never_written_and_nonces_are_unique(protected):
    path, secret = protected
    blobs = {f: (path / f).read_bytes() for f in _files(path)}
    assert not any(secret.material in b for b in blobs.values())
    m = len(secure.ENCRYPTED_MAGIC)
    nonces = [b[m:m + 12] for f, b in blobs.items() if f.endswith(".enc")]
    assert len(nonces) == len(set(nonces)) > 5
    raw = Secret.generate()
    assert raw.material.hex() not in repr(raw)


def test_missing_or_wrong_secret_fails_clearly(protected):
    path, _ = protected
    with pytest.raises(SecurityError, match="encrypted and keyed-encoded; pass the secret"):
        load_package(path, progress=False)
    with pytest.raises(SecurityError, match="wrong secret"):
        load_package(path, progress=False, secret=Secret.from_passphrase("tr0ub4dor"))


def test_unsigned_encrypted_file_that_is_modified_or_moved_fails_authentication(quantized, tmp_path):
    q, tok = quantized
    secret = Secret.generate()
    path = export_package(q, tok, tmp_path / "pkg", protect=ProtectConfig(encrypt=True), secret=secret)
    f = path / "layers" / "layer_002" / "weights.safetensors.enc"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(SecurityError, match="layer_002/weights.safetensors.enc: modified"):
        load_package(path, progress=False, secret=secret)  # the default manifest check sees it first
    with pytest.raises(SecurityError, match="layer_002/weights.safetensors.enc: authentication failed"):
        load_package(path, progress=False, secret=secret, verify=False)  # and AES-GCM without it
    shutil.copy(path / "layers" / "layer_001" / "weights.safetensors.enc", f)  # a valid file, wrong place
    with pytest.raises(SecurityError, match="layer_002/weights.safetensors.enc: authentication failed"):
        load_package(path, progress=False, secret=secret, verify=False)


def test_keyed_encoding_is_exact_with_the_key_and_garbage_without(quantized, tmp_path):
    q, tok = quantized
    secret = Secret.generate()
    path = export_package(q, tok, tmp_path / "pkg", protect=ProtectConfig(encode=True), secret=secret)
    plain = export_package(q, tok, tmp_path / "plain")
    for layer in ("layer_000", "outer"):
        enc = load_file(str(path / "layers" / layer / "weights.safetensors"))
        ref = load_file(str(plain / "layers" / layer / "weights.safetensors"))
        assert {k: (v.dtype, v.shape) for k, v in enc.items()} == {k: (v.dtype, v.shape) for k, v in ref.items()}
        changed = [k for k in ref if not torch.equal(enc[k], ref[k])]
        expected = {k for k in ref if not k.endswith(".mask") and ref[k].numel() >= 8
                    and not (ref[k].is_floating_point() and not ref[k].any())}  # -0.0 == 0.0
        assert set(changed) == expected
    assert package_bytes(path) - package_bytes(plain) < 2048  # same tensors, a few metadata bytes more
    want = _logits(q.model)
    assert torch.equal(_logits(load_package(path, progress=False, secret=secret).model), want)
    raw = _logits(load_package(path, progress=False, decode=False).model)
    agree = (raw.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree < 0.2, agree  # a random 256-token model agrees ~1/256 by chance
    with pytest.raises(SecurityError, match="keyed-encoded"):
        load_package(path, progress=False)


def test_encoding_round_trips_every_dtype():
    keys = secure.DerivedKeys(Secret.generate(), b"s" * 16, 10)
    ts = {"f16": torch.randn(7, 5).half(), "f32": torch.randn(33), "bf16": torch.randn(4, 4).bfloat16(),
          "u8": torch.randint(0, 256, (100,), dtype=torch.uint8), "i64": torch.arange(9),
          "b": torch.rand(17) > 0.5, "empty": torch.zeros(0), "x.mask": torch.randint(0, 256, (8,), dtype=torch.uint8)}
    enc = secure.encode_tensors(ts, keys, "layers/x/weights.safetensors")
    dec = secure.decode_tensors(enc, keys, "layers/x/weights.safetensors")
    for k in ts:
        assert torch.equal(dec[k], ts[k]) and dec[k].dtype == ts[k].dtype, k
    assert not torch.equal(enc["f32"], ts["f32"]) and torch.equal(enc["x.mask"], ts["x.mask"])
    other = secure.decode_tensors(enc, keys, "layers/y/weights.safetensors")  # keystream is per file
    assert not torch.equal(other["f32"], ts["f32"])


def test_protect_needs_a_secret_and_config_round_trips(quantized, tmp_path):
    q, tok = quantized
    with pytest.raises(ValueError, match="need a secret"):
        export_package(q, tok, tmp_path / "pkg", protect=ProtectConfig(encrypt=True))
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.iterdir())  # nothing half-written
    cfg = ProtectConfig(encrypt=True, scrypt_log2_n=16)
    assert ProtectConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="protect"):  # an export option, not a stage: no recipe holds one
        StageConfig.from_json(cfg.to_json())
    with pytest.raises(ValueError, match="scrypt_log2_n"):
        ProtectConfig(scrypt_log2_n=3)
    with pytest.raises(ValueError, match="32 bytes"):
        Secret.from_bytes(b"short")


def test_secret_file_round_trip(tmp_path):
    s = Secret.generate()
    p = s.save(tmp_path / "k.secret")
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert Secret.from_file(p) == s
    (tmp_path / "bad").write_text("zz")
    with pytest.raises(SecurityError, match="hex"):
        Secret.from_file(tmp_path / "bad")


def test_ckks_linear_layer_on_encrypted_activations():
    pytest.importorskip("tenseal")
    from uqcit.tensor.formats import QuantFormat
    from uqcit.tensor.quant import dequantize, quantize

    g = torch.Generator().manual_seed(0)
    w = dequantize(quantize(torch.randn(8, 64, generator=g) * 0.05, QuantFormat(bits=4, group_size=32)))
    x = torch.randn(2, 64, generator=g)
    res = secure.ckks_linear(w, x, plain_repeats=20)
    assert res.rows == 8 and res.cols == 64 and res.tokens == 2
    assert res.rel_error < 1e-4, res.summary()  # CKKS at 2^40 scale is ~1e-7 relative; 1e-4 would be a bug
    assert res.overhead > 1 and res.ciphertext_bytes > res.plaintext_bytes
    assert "CKKS" in res.summary() and res.figure().data[0].uid == "ckks-seconds"
    with pytest.raises(ValueError, match="need weight"):
        secure.ckks_linear(w, torch.randn(2, 63))


def test_cli_keygen_sign_encrypt_verify_and_refuse(tmp_path, capsys):
    from uqcit.cli import main

    keys = tmp_path / "keys"
    assert main(["keygen", "--out", str(keys), "--secret"]) == 0
    pkg = tmp_path / "pkg"
    assert main(["compress", "--model", "tiny-llama", "--out", str(pkg), "--quick", "1", "--no-progress",
                 "--sign", str(keys / "uqcit.key"), "--encrypt", "--encode",
                 "--secret-file", str(keys / "uqcit.secret")]) == 0
    # the job wrote validation files after export and re-signed: the package still verifies
    assert json.loads((pkg / "validation" / "perplexity.json").read_text())["windows"] == 1
    assert main(["verify", str(pkg), "--public-key", str(keys / "uqcit.pub")]) == 0
    assert "signature valid" in capsys.readouterr().out
    assert main(["eval", str(pkg), "--reference", "none", "--quick", "1", "--no-progress"]) == 2
    assert "pass the secret" in capsys.readouterr().err
    (pkg / "config.json").write_bytes((pkg / "config.json").read_bytes() + b" ")
    assert main(["verify", str(pkg), "--public-key", str(keys / "uqcit.pub")]) == 2
    assert "config.json: modified" in capsys.readouterr().err
    assert main(["keygen", "--out", str(keys)]) == 2  # never overwrites
    assert main(["compress", "--model", "tiny-llama", "--out", str(tmp_path / "p2"), "--encrypt"]) == 2
    assert "--secret-file" in capsys.readouterr().err


def test_pruned_sparse_package_is_signed_encrypted_and_encoded_exactly(key, tmp_path):
    from uqcit.stages.prune import PruneConfig, prune_model

    model, tok = tiny_model("gpt2")
    levels = analyze_levels(model)
    res = prune_model(model, levels, PruneConfig(method="magnitude", kept_fraction=0.2, outside_blocks=True),
                      progress=False)
    secret = Secret.generate()
    path = export_package(res, tok, tmp_path / "pkg", signing_key=key, protect=FAST, secret=secret)
    loaded = load_package(path, progress=False, public_key=key.public_key(), secret=secret)
    assert torch.equal(_logits(loaded.model), _logits(res.model))
