"""PAR crypto throughput: mint+seal+open per second against raw HPKE in the same process.

Rows (ops/s, median of --repeat repetitions, rows run round-robin so noise hits all alike):
- reference: raw `hpke.Suite(X25519, HKDF-SHA256, AES-256-GCM)` encrypt+decrypt (and decrypt
  alone) of the very bytes a PAR seals (a Capability with a ~400-char presigned GET URL), with an
  `info` as long as the PAR's: the floor any PAR on this suite pays.
- PAR.seal + open (and open alone): plus pydantic models and the metadata digest bound into info.
- + to_data/JSON/from_data: plus the wire round trip (dict -> JSON text -> dict -> PAR).
- + passphrase: to_data/from_data with a passphrase: two scrypt (n=2**15) derivations per op
  dominate; the row shows that cost, not the PAR code's.

Reading it: `ratio` = the row's ops/s / its reference row's ops/s in this same run, so it holds
across machines; 0.50 means twice the cost of bare HPKE. Absolute ops/s only compare within a run.

    .venv/bin/python benchmarks/bench_par_crypto.py [--duration 1] [--repeat 5] [--iterations N]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import cryptography
from cryptography.hazmat.primitives import hpke

from orchestrator import PAR, KeyPair, PARKind
from orchestrator.core.par_rules import sealing_info
from schemas.par import Capability

PASSPHRASE = "correct horse battery staple"  # noqa: S105
KEY = "jobs/x/input"


def presigned_url() -> str:
    """A SigV4 presigned GET URL shaped like the ones SeaweedFS/AWS presigning produces."""
    return (
        "https://objectstore.eu-west-1.storage.parjobs.example.internal:8333/parjobs-production/"
        f"{KEY}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=parjobs-3f9c1e7a2b4d6f80%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20250101T120000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&x-id=GetObject"
        "&X-Amz-Signature=9b2c4f7e1a3d5c6b8e0f2a4c6e8b0d2f4a6c8e0b2d4f6a8c0e2b4d6f8a0c2e4b"
    )


def run_for(op: Callable[[], object], *, duration: float, iterations: int | None) -> float:
    """Ops/s of `op`: `iterations` calls if given, else as many as fit in `duration` seconds."""
    gc.collect()
    count, start = 0, time.perf_counter()
    deadline = start + duration
    while (count < iterations) if iterations else (not count or time.perf_counter() < deadline):
        op()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per row per rep")
    parser.add_argument("--iterations", type=int, default=None, help="fixed ops per row per rep")
    parser.add_argument(
        "--scrypt-iterations", type=int, default=5, help="passphrase row's ops with --iterations"
    )
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (median reported)")
    args = parser.parse_args()

    keypair = KeyPair.generate("bench")
    capability = Capability(get_url=presigned_url())
    expires_at = datetime.now(UTC) + timedelta(hours=1)

    def seal() -> PAR:
        return PAR.seal(
            capability,
            kind=PARKind.OBJECT,
            recipient=keypair.public,
            issuer="bench",
            expires_at=expires_at,
            is_readable=True,
            key=KEY,
        )

    sample = seal()
    plaintext = capability.model_dump_json().encode()
    info = b"i" * len(sealing_info(sample.data))
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    public, private = keypair.public.sealing, keypair.sealing
    assert sample.open(keypair) == capability

    def raw_hpke() -> None:
        suite.decrypt(suite.encrypt(plaintext, public, info=info), private, info=info)

    sealed = suite.encrypt(plaintext, public, info=info)

    def raw_decrypt() -> None:
        suite.decrypt(sealed, private, info=info)

    def par_seal_open() -> None:
        seal().open(keypair)

    def par_round_trip() -> None:
        wire = json.dumps(seal().to_data())
        PAR.from_data(json.loads(wire)).open(keypair)

    def par_passphrase() -> None:
        wire = json.dumps(seal().to_data(passphrase=PASSPHRASE))
        PAR.from_data(json.loads(wire), PASSPHRASE).open(keypair)

    def par_open_only() -> None:
        sample.open(keypair)

    # (name, operation, is it the slow scrypt row, the reference row its ratio divides by)
    raw, raw_open = "raw HPKE encrypt+decrypt", "raw HPKE decrypt only"
    rows: list[tuple[str, Callable[[], object], bool, str]] = [
        (raw, raw_hpke, False, raw),
        (raw_open, raw_decrypt, False, raw_open),
        ("PAR.seal + open", par_seal_open, False, raw),
        ("PAR.open only", par_open_only, False, raw_open),
        ("PAR seal + to_data/JSON/from_data + open", par_round_trip, False, raw),
        ("  same, with passphrase (scrypt x2)", par_passphrase, True, raw),
    ]
    for _, op, slow, _ in rows:  # warm-up: imports, caches, pydantic validators
        run_for(op, duration=0, iterations=1 if slow else 50)
    results: dict[str, list[float]] = {row[0]: [] for row in rows}
    for _ in range(args.repeat):
        for name, op, slow, _ in rows:
            count = args.iterations and (args.scrypt_iterations if slow else args.iterations)
            results[name].append(run_for(op, duration=args.duration, iterations=count))

    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"python {platform.python_version()}, cryptography {cryptography.__version__}, "
        f"{platform.machine()}; plaintext {len(plaintext)} B (URL {len(presigned_url())} chars), "
        f"info {len(info)} B, sealed {len(sample.data.sealed)} B, "
        f"to_data JSON {len(json.dumps(sample.to_data()))} B"
    )
    mode = f"{args.iterations} ops/row" if args.iterations else f"{args.duration:g} s/row"
    print(f"{mode}, {args.repeat} repetitions round-robin; ops/s is the median")
    print()
    header = f"{'operation':<42} {'ops/s':>9} {'min':>9} {'max':>9} {'µs/op':>9}"
    print(f"{header} {'ratio':>6}  vs")
    print("-" * (len(header) + 32))
    for name, _, _, reference in rows:
        values = results[name]
        ratio = "" if name == reference else f"{median[name] / median[reference]:.3f}"
        line = (
            f"{name:<42} {median[name]:>9.0f} {min(values):>9.0f} {max(values):>9.0f} "
            f"{1e6 / median[name]:>9.1f} {ratio:>6}  {'' if name == reference else reference}"
        )
        print(line.rstrip())
    print()
    print("ratio = the row's ops/s / its reference row's ops/s, this run (1.0 = bare HPKE speed).")
    print("The passphrase row is dominated by scrypt (two derivations per op), not by PAR code.")


if __name__ == "__main__":
    main()
