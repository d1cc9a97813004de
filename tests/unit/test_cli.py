"""The `parjobs` command line's inputs, without a server: every wrong input is one line and exit 2.

Where a command would connect (RabbitMQ, the object store), the tests put an error instead:
a refused input must never get that far, and a valid one must get exactly there. The properties
(hypothesis) feed arbitrary text to the options that take free text.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import typer
import typer.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.core import TyperGroup
from typer.testing import CliRunner, Result

from orchestrator import KeyPair, __version__
from orchestrator.cli import _common, _jobs, _ops, app
from orchestrator.cli._exit import (
    EXIT_JOB_CANCELLED,
    EXIT_JOB_EXPIRED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_STATUS_HELP,
    ParjobsGroup,
)
from orchestrator.cli._inputs import strict_json
from orchestrator.client.tracking import with_progress
from orchestrator.core import crypto
from orchestrator.core.jobstate import fold
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import ParjobsError, UnknownUserError
from orchestrator.store.memory import MemoryObjectStore
from orchestrator.store.users import UserRegistry
from schemas.events import JobEvent, JobSheetState, Progress
from schemas.messages import JobReply, ProgressReport
from schemas.signing import SERVICE_ROLES, canonical_json
from tests.unit.test_jobstate import SAMPLES as JOB_SAMPLES

PASSPHRASE = "cli unit passphrase"
UID = "0123456789abcdef" * 2
FINGERPRINT = "ab" * 32


class ConnectionAttemptedError(ParjobsError, code="test.connection_attempted"):
    """Put where the CLI would connect: reaching it means every input check passed."""


def _refuse_to_connect(server: str) -> object:
    def connect(*_args: object, **_kwargs: object) -> object:
        raise ConnectionAttemptedError(f"would connect to {server}")

    return connect


BROKER = "error: would connect to RabbitMQ (test.connection_attempted)"
STORE = "error: would connect to the object store (test.connection_attempted)"
ADMIN = "error: would connect to the management API (test.connection_attempted)"
PREFIX = "parjobs"
# The broker user `parjobs users add me` makes (its name quoted: it holds `:` and `@`).
USER_URL = f"amqp://user%3Ame%40{PREFIX}:secret@127.0.0.1:5672/"


@dataclass(frozen=True)
class Files:
    key: Path  # a key file of user "me", under PASSPHRASE
    pub: Path
    odd_key: Path  # a key whose name is no account name
    orphan: Path  # no file, but its .pub exists
    input: Path
    garbage: Path
    dir: Path


@pytest.fixture(scope="module", autouse=True)
def no_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every connection the CLI opens goes through `_common`: there, it is refused. The user's
    settings are a registered user's broker URL and the operator's service keys file."""
    service_keys = tmp_path_factory.mktemp("operator") / "service-keys.json"
    ServiceKeys({role: KeyPair.generate(role).public for role in SERVICE_ROLES}).save(service_keys)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_common, "AMQPBroker", _refuse_to_connect("RabbitMQ"))
        patch.setattr(_common, "S3ObjectStore", _refuse_to_connect("the object store"))
        patch.setattr(_common, "BrokerAdmin", _refuse_to_connect("the management API"))
        patch.setenv("PARJOBS_AMQP_URL", USER_URL)
        patch.setenv("PARJOBS_PREFIX", PREFIX)
        patch.setenv("PARJOBS_SERVICE_KEYS_FILE", str(service_keys))
        patch.setenv("PARJOBS_KEY_PASSPHRASE", PASSPHRASE)
        patch.setenv("PARJOBS_S3_ACCESS_KEY_ID", "unit")
        patch.setenv("PARJOBS_S3_SECRET_ACCESS_KEY", "unit-secret")
        # Building the click command from the typer app takes ~25 ms, far more than a run: build
        # each app once, not once per run of the thousand below.
        patch.setattr(typer.testing, "_get_command", functools.cache(typer.main.get_command))
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("cli")
    me = KeyPair.generate("me")
    with pytest.MonkeyPatch.context() as patch:
        # scrypt's lowest accepted cost, recorded in the file: each of the hundreds of runs below
        # opens the key in a few ms instead of ~90; loading reads the cost from the file as ever.
        patch.setattr(crypto, "_SCRYPT_LOG2_N", 10)
        me.save(root / "me.key", PASSPHRASE)
        KeyPair.generate("Build Server").save(root / "odd.key", PASSPHRASE)
    (root / "me.key.pub").write_text(json.dumps(me.public.to_data()))
    (root / "orphan.pub").write_text("{}")
    (root / "input.txt").write_text("one\ntwo\n")
    (root / "garbage").write_text("not a key {")
    (root / "dir").mkdir()
    return Files(
        key=root / "me.key",
        pub=root / "me.key.pub",
        odd_key=root / "odd.key",
        orphan=root / "orphan",
        input=root / "input.txt",
        garbage=root / "garbage",
        dir=root / "dir",
    )


def parjobs(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def refused(result: Result) -> str:
    """The one error line of a run that ended with exit 2 and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    # Anything but SystemExit escaping the command is what would have printed a traceback.
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def refused_before_connecting(result: Result) -> str:
    line = refused(result)
    assert "would connect" not in line
    return line


# --- each wrong input, one by one ----------------------------------------------------------------


def _submit(files: Files, *extra: str | Path) -> list[str | Path]:
    return ["submit", "checksum", files.input, "--key", files.key, *extra]


Args = Callable[[Files], list[str | Path]]

WRONG_INPUTS: list[tuple[str, Args, str]] = [
    # (id, args (a function of the files), what the line must say)
    ("no-command", lambda f: [], "Missing command"),
    ("unknown-option", lambda f: ["--bogus"], "No such option: --bogus"),
    ("unknown-command", lambda f: ["launch"], "No such command 'launch'"),
    ("key-exists", lambda f: ["keys", "new", f.key], "exists; choose another path"),
    ("key-pub-exists", lambda f: ["keys", "new", f.orphan], "orphan.pub exists"),
    ("key-no-dir", lambda f: ["keys", "new", f.dir / "none" / "k"], "is not a directory"),
    (
        "key-name",
        lambda f: ["keys", "new", f.dir / "k", "--name", "Big Name"],
        "'Big Name' is not an account name",
    ),
    ("show-missing", lambda f: ["keys", "show", f.dir / "none"], "does not exist"),
    ("show-dir", lambda f: ["keys", "show", f.dir], "is a directory"),
    ("show-garbage", lambda f: ["keys", "show", f.garbage], "is not a parjobs key file"),
    ("json-malformed", lambda f: _submit(f, "--params-json", "{bad"), "not valid JSON"),
    ("json-array", lambda f: _submit(f, "--params-json", "[1]"), "not an array"),
    ("json-string", lambda f: _submit(f, "--params-json", '"n"'), "not a string"),
    ("json-number", lambda f: _submit(f, "--params-json", "3"), "not a number"),
    ("json-null", lambda f: _submit(f, "--params-json", "null"), "not null"),
    ("json-bool", lambda f: _submit(f, "--params-json", "true"), "not a boolean"),
    ("json-nan", lambda f: _submit(f, "--params-json", '{"a": NaN}'), "NaN is not a JSON number"),
    ("json-inf", lambda f: _submit(f, "--params-json", '{"a": 1e999}'), "too large a number"),
    ("json-surrogate", lambda f: _submit(f, "--params-json", '{"a": "\\ud800"}'), "surrogate"),
    ("json-deep", lambda f: _submit(f, "--params-json", "[" * 100_000), "nested too deeply"),
    ("json-big-int", lambda f: _submit(f, "--params-json", "9" * 5000), "not valid JSON"),
    ("param-no-equals", lambda f: _submit(f, "-p", "n"), "'n' is not NAME=VALUE"),
    ("param-no-name", lambda f: _submit(f, "-p", "=3"), "'=3' is not NAME=VALUE"),
    ("spend-text", lambda f: _submit(f, "--max-spend", "abc"), "'abc' is not an amount"),
    ("spend-zero", lambda f: _submit(f, "--max-spend", "0"), "greater than 0"),
    ("spend-dust", lambda f: _submit(f, "--max-spend", "0.0000001"), "greater than 0"),
    ("spend-negative", lambda f: _submit(f, "--max-spend", "-1"), "greater than 0"),
    ("spend-nan", lambda f: _submit(f, "--max-spend", "NaN"), "finite"),
    ("spend-huge", lambda f: _submit(f, "--max-spend", "1e30"), "too large"),
    ("lifetime-zero", lambda f: _submit(f, "--lifetime", "0"), "greater than or equal to 1"),
    ("lifetime-text", lambda f: _submit(f, "--lifetime", "soon"), "valid integer"),
    ("lifetime-week", lambda f: _submit(f, "--lifetime", "604801"), "less than or equal to"),
    ("account-case", lambda f: _submit(f, "--account", "Me"), "'Me' is not an account name"),
    ("account-service", lambda f: _submit(f, "--account", "access"), "service's accounts"),
    ("output-file", lambda f: _submit(f, "--output", f.input), "is a file"),
    ("key-missing", lambda f: ["submit", "checksum", f.input], "Missing option '--key'"),
    (
        "key-file-missing",
        lambda f: ["submit", "checksum", f.input, "--key", f.dir / "none"],
        "does not exist",
    ),
    (
        "key-file-garbage",
        lambda f: ["submit", "checksum", f.input, "--key", f.garbage],
        "is not a parjobs key file",
    ),
    (
        "key-name-no-account",
        lambda f: ["submit", "checksum", f.input, "--key", f.odd_key],
        "'Build Server' is not an account name",
    ),
    (
        "input-missing",
        lambda f: ["submit", "checksum", f.dir / "none", "--key", f.key],
        "does not exist",
    ),
    ("input-dir", lambda f: ["submit", "checksum", f.dir, "--key", f.key], "is a directory"),
    (
        "calculation-empty",
        lambda f: ["submit", "", f.input, "--key", f.key],
        "at least 1 character",
    ),
    (
        "calculation-not-utf8",
        lambda f: ["submit", "\udcff", f.input, "--key", f.key],
        "is not valid UTF-8",
    ),
    ("status-uid", lambda f: ["status", "xyz", "--key", f.key], "'xyz' is not a job uid"),
    ("status-uid-upper", lambda f: ["status", UID.upper(), "--key", f.key], "is not a job uid"),
    ("watch-uid", lambda f: ["watch", "1", "--key", f.key], "is not a job uid"),
    ("events-uid", lambda f: ["events", UID + "0", "--key", f.key], "is not a job uid"),
    ("status-key-missing", lambda f: ["status", UID], "Missing option '--key'"),
    ("watch-key-missing", lambda f: ["watch", UID], "Missing option '--key'"),
    ("events-key-missing", lambda f: ["events", UID], "Missing option '--key'"),
    ("fetch-uid", lambda f: ["fetch", "x", f.dir, "--key", f.key], "is not a job uid"),
    ("fetch-into-file", lambda f: ["fetch", UID, f.input, "--key", f.key], "is a file"),
    (
        "user-name",
        lambda f: ["users", "add", "Bob", "--public-key", f.pub],
        "'Bob' is not an account name",
    ),
    (
        "user-service",
        lambda f: ["users", "add", "held", "--public-key", f.pub],
        "service's accounts",
    ),
    (
        "user-key-garbage",
        lambda f: ["users", "add", "bob", "--public-key", f.garbage],
        "cannot read public keys",
    ),
    (
        "user-key-missing",
        lambda f: ["users", "add", "bob", "--public-key", f.dir / "none"],
        "cannot read public keys",
    ),
    ("deposit-text", lambda f: ["account", "deposit", "me", "lots"], "'lots' is not an amount"),
    ("deposit-zero", lambda f: ["account", "deposit", "me", "0"], "greater than 0"),
    ("deposit-name", lambda f: ["account", "deposit", "Me", "1"], "is not an account name"),
    ("balance-name", lambda f: ["account", "balance", "x y"], "'x y' is not an account name"),
    ("statement-name", lambda f: ["account", "statement", ""], "is not an account name"),
    (
        "cheque-resource",
        lambda f: ["cheque", "write", "--key", f.key, "--resource", "x", "--max-spend", "1"],
        "'x' is not a job request's fingerprint",
    ),
    (
        "cheque-spend",
        lambda f: [
            "cheque",
            "write",
            "--key",
            f.key,
            "--resource",
            FINGERPRINT,
            "--max-spend",
            "0",
        ],
        "greater than 0",
    ),
    (
        "cheque-lifetime",
        lambda f: [
            *("cheque", "write", "--key", f.key, "--resource", FINGERPRINT, "--max-spend", "1"),
            *("--lifetime", "0"),
        ],
        "greater than or equal to 1",
    ),
    (
        "cheque-lifetime-years",
        lambda f: [
            *("cheque", "write", "--key", f.key, "--resource", FINGERPRINT, "--max-spend", "1"),
            *("--lifetime", str(10**12)),
        ],
        "less than or equal to",
    ),
    (
        "cheque-payer",
        lambda f: [
            *("cheque", "write", "--key", f.key, "--resource", FINGERPRINT, "--max-spend", "1"),
            *("--payer", "external"),
        ],
        "service's accounts",
    ),
    ("dlq-limit", lambda f: ["dlq", "list", "--limit", "0"], "greater than or equal to 1"),
    ("dlq-limit-text", lambda f: ["dlq", "list", "--limit", "all"], "valid integer"),
    ("redrive-nothing", lambda f: ["dlq", "redrive"], "one of the two"),
    ("redrive-both", lambda f: ["dlq", "redrive", "m1", "--all"], "one of the two"),
    ("replay-option", lambda f: ["replay", "--every"], "No such option"),
]


@pytest.mark.parametrize(
    ("build", "says"),
    [pytest.param(build, says, id=name) for name, build, says in WRONG_INPUTS],
)
def test_a_wrong_input_is_one_line_and_exit_2(files: Files, build: Args, says: str) -> None:
    line = refused_before_connecting(parjobs(*build(files)))
    assert says in line


@pytest.mark.parametrize(
    ("build", "server"),
    [
        pytest.param(lambda f: ["status", UID, "--key", f.key], BROKER, id="status"),
        pytest.param(lambda f: ["watch", UID, "--key", f.key], BROKER, id="watch"),
        pytest.param(lambda f: ["events", UID, "--key", f.key], BROKER, id="events"),
        pytest.param(lambda f: ["dlq", "list", "--limit", "5"], BROKER, id="dlq-list"),
        pytest.param(lambda f: ["dlq", "redrive", "--all"], BROKER, id="dlq-redrive"),
        pytest.param(lambda f: ["account", "deposit", "me", "12.50"], STORE, id="deposit"),
        pytest.param(lambda f: ["account", "balance", "access"], STORE, id="balance"),
        pytest.param(lambda f: ["account", "statement", "me"], STORE, id="statement"),
        pytest.param(lambda f: ["ledger", "verify"], STORE, id="ledger-verify"),
        pytest.param(lambda f: ["replay", "--all"], STORE, id="replay"),
    ],
)
def test_valid_inputs_get_as_far_as_connecting(files: Files, build: Args, server: str) -> None:
    assert refused(parjobs(*build(files))) == server


def test_valid_submit_and_fetch_get_as_far_as_connecting(files: Files) -> None:
    submit = _submit(files, "-p", "n=3", "--params-json", '{"a": [1, 2.5]}', "--lifetime", "60")
    assert refused(parjobs(*submit, "--account", "me", "--max-spend", "0.5")) == BROKER
    assert refused(parjobs("fetch", UID, files.dir / "out", "--key", files.key)) == BROKER
    assert refused(parjobs("users", "add", "bob", "--public-key", files.pub)) == STORE


def test_wrong_passphrase(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARJOBS_KEY_PASSPHRASE", "not it")
    line = refused_before_connecting(parjobs("fetch", UID, files.dir, "--key", files.key))
    assert "wrong passphrase" in line


def test_no_passphrase_at_the_prompt(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARJOBS_KEY_PASSPHRASE")
    assert refused(parjobs("keys", "show", files.key)) == "error: aborted at the prompt"


def test_invalid_setting_is_named(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARJOBS_AMQP_URL", "http://rabbit")
    line = refused_before_connecting(parjobs("status", UID, "--key", files.key))
    assert line.startswith("error: invalid AMQPSettings: amqp_url: ")
    assert "Value error" not in line


USERS_COMMANDS: dict[str, Args] = {
    "submit": _submit,
    "status": lambda f: ["status", UID, "--key", f.key],
    "watch": lambda f: ["watch", UID, "--key", f.key],
    "events": lambda f: ["events", UID, "--key", f.key],
    "fetch": lambda f: ["fetch", UID, f.dir, "--key", f.key],
}


@pytest.mark.parametrize("command", sorted(USERS_COMMANDS))
def test_a_users_command_connects_only_as_a_registered_users_broker_user(
    files: Files, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setenv("PARJOBS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    line = refused_before_connecting(parjobs(*USERS_COMMANDS[command](files)))
    assert "broker user 'guest' is no registered user" in line
    assert "parjobs users add" in line


def test_a_users_command_needs_the_operators_service_keys(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PARJOBS_SERVICE_KEYS_FILE")
    line = refused_before_connecting(parjobs("watch", UID, "--key", files.key))
    assert "set PARJOBS_SERVICE_KEYS_FILE" in line


def test_users_add_registers_the_key_then_provisions_the_broker_user(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryObjectStore()
    monkeypatch.setattr(_common, "S3ObjectStore", lambda *_args, **_kwargs: store)
    assert refused(parjobs("users", "add", "me", "--public-key", files.pub)) == ADMIN
    record = anyio.run(UserRegistry(store).get, "me")
    assert record.public_key == KeyPair.load(files.key, PASSPHRASE).public.to_wire()


def test_keys_new_then_show(tmp_path: Path) -> None:
    made = parjobs("keys", "new", tmp_path / "k", "--name", "alice")
    assert made.exit_code == 0, made.stderr
    assert (tmp_path / "k.pub").exists()
    shown = parjobs("keys", "show", tmp_path / "k")
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.startswith("alice: fingerprint ")


def test_cheque_write_needs_no_server(files: Files) -> None:
    written = parjobs(
        *("cheque", "write", "--key", files.key), *("--resource", FINGERPRINT, "--max-spend", "3")
    )
    assert written.exit_code == 0, written.stderr
    cheque = json.loads(written.stdout)
    assert (cheque["payer"], cheque["max_spend"], cheque["resource"]) == (
        "me",
        "3.000000",
        FINGERPRINT,
    )


def test_version() -> None:
    shown = parjobs("--version")
    assert shown.exit_code == 0
    assert shown.stdout == f"parjobs {__version__}\n"


def test_as_a_process_an_error_is_one_line_on_stderr(files: Files) -> None:
    """`main()` as the installed command runs it: real streams, real exit status."""

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *map(str, args)],
            env={**os.environ, "PARJOBS_KEY_PASSPHRASE": PASSPHRASE},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    broken = run(*_submit(files, "--params-json", "{bad"))
    assert (broken.returncode, broken.stdout) == (2, "")
    assert broken.stderr.startswith("error: Invalid value for '--params-json': not valid JSON")
    assert broken.stderr.count("\n") == 1
    version = run("--version")
    assert (version.returncode, version.stdout, version.stderr) == (
        0,
        f"parjobs {__version__}\n",
        "",
    )


def test_help_tells_the_exit_statuses() -> None:
    shown = parjobs("--help")
    assert shown.exit_code == 0
    assert EXIT_STATUS_HELP in " ".join(shown.stdout.split())


# --- the groups, and the spellings before them ---------------------------------------------------

# (the group now, the command's spelling before the grouping, where it gets)
GROUPED: list[tuple[str, Args, str]] = [
    ("jobs", lambda f: _submit(f, "--json"), BROKER),
    ("jobs", lambda f: ["status", UID, "--key", f.key, "--json"], BROKER),
    ("jobs", lambda f: ["watch", UID, "--key", f.key, "--json"], BROKER),
    ("jobs", lambda f: ["events", UID, "--key", f.key, "--json"], BROKER),
    ("jobs", lambda f: ["fetch", UID, f.dir / "out", "--key", f.key], BROKER),
    ("accounts", lambda f: ["users", "add", "bob", "--public-key", f.pub], STORE),
    ("accounts", lambda f: ["ledger", "verify", "--json"], STORE),
    ("admin", lambda f: ["replay", "--json"], STORE),
    ("admin", lambda f: ["dlq", "list", "--json"], BROKER),
    ("admin", lambda f: ["dlq", "redrive", "--all"], BROKER),
    ("admin", lambda f: ["broker", "setup"], ADMIN),
]


@pytest.mark.parametrize(
    ("group", "build", "server"),
    [pytest.param(*case, id=f"{case[0]}-{i}") for i, case in enumerate(GROUPED)],
)
def test_a_grouped_command_answers_to_its_old_spelling_too(
    files: Files, group: str, build: Args, server: str
) -> None:
    assert refused(parjobs(group, *build(files))) == server
    assert refused(parjobs(*build(files))) == server


@pytest.mark.parametrize(
    ("now", "before"),
    [
        (["accounts", "deposit", "me", "1"], ["account", "deposit", "me", "1"]),
        (["accounts", "balance", "me", "--json"], ["account", "balance", "me", "--json"]),
        (["accounts", "statement", "me", "--json"], ["account", "statement", "me", "--json"]),
    ],
)
def test_account_commands_moved_up_into_accounts(now: list[str], before: list[str]) -> None:
    assert refused(parjobs(*now)) == STORE
    assert refused(parjobs(*before)) == STORE


def test_commands_that_need_no_server_answer_the_same_both_ways(files: Files) -> None:
    cheque = ("cheque", "write", "--key", files.key, "--resource", FINGERPRINT, "--max-spend", "3")
    for written in (parjobs("accounts", *cheque), parjobs(*cheque)):
        assert written.exit_code == 0, written.stderr
        assert json.loads(written.stdout)["payer"] == "me"
    now, before = parjobs("admin", "asyncapi"), parjobs("asyncapi")
    assert now.exit_code == before.exit_code == 0
    assert now.stdout == before.stdout
    assert json.loads(now.stdout)["asyncapi"].startswith("3.")


def test_help_lists_the_groups_and_hides_the_old_spellings() -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    listed = [name for name, command in root.commands.items() if not command.hidden]
    assert listed == ["keys", "jobs", "accounts", "admin", "daemons", "dev"]
    hidden = {name for name, command in root.commands.items() if command.hidden}
    assert hidden == {
        *("submit", "status", "watch", "events", "fetch"),
        *("users", "account", "cheque", "ledger"),
        *("broker", "dlq", "replay", "asyncapi"),
        *("access", "storage", "compute"),
        *("demo", "par-demo", "s3"),
    }
    dev = root.commands["dev"]
    assert isinstance(dev, TyperGroup)
    assert set(dev.commands) == {"up", "demo", "par-demo", "s3"}


def test_dev_alone_runs_everything_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    monkeypatch.setattr(_ops, "dev", lambda: started.append("dev"))
    assert parjobs("dev").exit_code == 0
    assert started == ["dev"]


def test_keys_show_as_json(files: Files) -> None:
    shown = parjobs("keys", "show", files.key, "--json")
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "name": "me",
        "fingerprint": KeyPair.load(files.key, PASSPHRASE).fingerprint,
    }


def test_the_passphrase_variable_before_still_opens_keys_with_a_note(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PARJOBS_KEY_PASSPHRASE")
    monkeypatch.setenv("PARJOBS_PASSPHRASE", PASSPHRASE)
    shown = parjobs("keys", "show", files.key)
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.startswith("me: fingerprint ")
    assert shown.stderr == (
        "note: PARJOBS_PASSPHRASE is deprecated; set PARJOBS_KEY_PASSPHRASE instead\n"
    )
    monkeypatch.setenv("PARJOBS_KEY_PASSPHRASE", "the new one wins")
    assert "wrong passphrase" in refused(parjobs("keys", "show", files.key))


# --- how a followed job ended is the exit status -------------------------------------------------


def _ended(end: str) -> list[JobSheetState]:
    """The states of a job that ran and ended `end` (unsealed: the fake client trusts them)."""
    ran = [] if end == "expired" else ["run_started"]  # a job expires only before it runs
    types = ["submitted", "storage_contracted", "compute_contracted", *ran, end]
    events = [
        JobEvent(job_uid=UID, seq=seq, actor="access", payload=JOB_SAMPLES[name])
        for seq, name in enumerate(types, start=1)
    ]
    return [fold(events[:n]) for n in range(1, len(events) + 1)]


@dataclass
class EndingClient:
    """Stands in for the client: the job's states come, and it ends as told."""

    sheets: list[JobSheetState]

    async def watch(self, job_uid: str) -> AsyncIterator[JobSheetState]:
        for sheet in self.sheets:
            yield sheet


@pytest.mark.parametrize(
    ("end", "status"),
    [
        ("completed", EXIT_OK),
        ("failed", EXIT_JOB_FAILED),
        ("cancelled", EXIT_JOB_CANCELLED),
        ("expired", EXIT_JOB_EXPIRED),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_watch_exits_with_how_the_job_ended(
    files: Files, monkeypatch: pytest.MonkeyPatch, end: str, status: int, as_json: bool
) -> None:
    sheets = _ended(end)

    @asynccontextmanager
    async def session(_user: KeyPair) -> AsyncIterator[EndingClient]:
        yield EndingClient(sheets)

    monkeypatch.setattr(_jobs, "client_session", session)
    watched = parjobs("jobs", "watch", UID, "--key", files.key, *(["--json"] if as_json else []))
    assert watched.exit_code == status, watched.stderr
    if as_json:
        lines = [json.loads(line) for line in watched.stdout.splitlines()]
        assert [line["state"] for line in lines] == [sheet.state.value for sheet in sheets]
    else:
        assert f"job {UID} {sheets[-1].state.value}" in watched.stdout


def test_status_shows_the_runs_progress_snapshot_and_watch_the_reports(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = _ended("completed")[3]  # run_started: running, no progress in the log
    report = ProgressReport(
        job_uid=UID, seq=4, time=running.updated_at, payload=Progress(message="tick 7 of 10")
    )
    asked: list[bool] = []

    @dataclass
    class ProgressClient(EndingClient):
        async def job(self, job_uid: str, *, with_progress: bool = False) -> JobReply:
            asked.append(with_progress)
            return JobReply(sheet=running, progress=report if with_progress else None)

    watched_sheets = [running, with_progress(running, report)]

    @asynccontextmanager
    async def session(_user: KeyPair) -> AsyncIterator[ProgressClient]:
        yield ProgressClient(watched_sheets)

    monkeypatch.setattr(_jobs, "client_session", session)
    told = parjobs("jobs", "status", UID, "--key", files.key, "--json")
    assert json.loads(told.stdout)["progress"] == "tick 7 of 10"
    assert asked == [True]
    assert "progress: tick 7 of 10" in parjobs("jobs", "status", UID, "--key", files.key).stdout
    lines = parjobs("jobs", "watch", UID, "--key", files.key, "--json").stdout.splitlines()
    assert [json.loads(line)["progress"] for line in lines] == [None, "tick 7 of 10"]


# --- the root command's reporting, on a command that raises what it is told -----------------------


class Settingish(BaseModel):
    port: int


def _raising(error: BaseException) -> typer.Typer:
    raiser = typer.Typer(cls=ParjobsGroup)

    @raiser.command()
    def run() -> None:
        raise error

    @raiser.command()
    def other() -> None:
        """A second command, so `run` is a subcommand as in parjobs."""

    return raiser


def _validation_error() -> Exception:
    try:
        Settingish.model_validate({"port": "eighty"})
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable: 'eighty' is no int")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        pytest.param(
            UnknownUserError("no user 'bob'\nregister them first"),
            "error: no user 'bob'; register them first (user.unknown)",
            id="parjobs-multiline",
        ),
        pytest.param(ParjobsError("bell\x07 and \x1b[31mred"), r"error: bell\x07 and \x1b[31mred"),
        pytest.param(ParjobsError(), "error: ParjobsError", id="no-message"),
        pytest.param(
            FileNotFoundError(2, "No such file or directory", "/x/y"),
            "error: No such file or directory: /x/y",
            id="oserror",
        ),
        pytest.param(
            _validation_error(),
            "error: invalid Settingish: port: Input should be a valid integer, unable to parse "
            "string as an integer",
            id="validation",
        ),
    ],
)
def test_reported_errors_are_one_escaped_line(error: BaseException, line: str) -> None:
    result = CliRunner().invoke(_raising(error), ["run"])
    assert refused(result) == line


def test_a_bug_keeps_its_traceback() -> None:
    result = CliRunner().invoke(_raising(KeyError("bug")), ["run"])
    assert isinstance(result.exception, KeyError)
    assert result.stderr == ""


def test_exit_status_of_a_command_stays() -> None:
    result = CliRunner().invoke(_raising(typer.Exit(1)), ["run"])
    assert (result.exit_code, result.stderr) == (1, "")


def test_a_caller_that_is_not_standalone_gets_the_exception() -> None:
    command = typer.main.get_command(_raising(UnknownUserError("no user")))
    with pytest.raises(UnknownUserError):
        command.main(["run"], standalone_mode=False)


# --- properties: arbitrary text never makes a traceback ------------------------------------------

FREE_TEXT = st.text(max_size=80)
# Every value RFC 8785 can encode (the I-JSON domain): integers beyond 2**53 have no canonical form.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
PROPERTY = settings(max_examples=150, deadline=None)


@PROPERTY
@given(text=FREE_TEXT)
def test_any_params_json_is_sent_or_refused_in_one_line(files: Files, text: str) -> None:
    line = refused(parjobs(*_submit(files, "--params-json", text)))
    assert line == BROKER or line.startswith("error: Invalid value for '--params-json': ")


@PROPERTY
@given(parameters=st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5))
def test_every_json_object_is_accepted(files: Files, parameters: dict[str, object]) -> None:
    assert refused(parjobs(*_submit(files, "--params-json", json.dumps(parameters)))) == BROKER


@PROPERTY
@given(big=st.integers(min_value=2**53) | st.integers(max_value=-(2**53)))
def test_integers_without_a_canonical_form_are_refused_in_one_line(files: Files, big: int) -> None:
    line = refused(parjobs(*_submit(files, "--params-json", json.dumps({"n": big}))))
    assert line.startswith("error: invalid JobRequest: parameters: ")


@PROPERTY
@given(name=st.text(min_size=1, max_size=10).filter(lambda n: "=" not in n), value=FREE_TEXT)
@example(name="n", value=str(2**53))
@example(name="n", value=f"[1, {-(2**53)}]")
def test_every_param_value_is_sent_or_refused_in_one_line(
    files: Files, name: str, value: str
) -> None:
    """A value is sent as JSON if it is JSON, else as a string; but JSON that RFC 8785 cannot
    encode (an integer beyond 2**53) is refused, as in --params-json, never sent as a string."""
    line = refused(parjobs(*_submit(files, "-p", f"{name}={value}")))
    if line != BROKER:
        assert line.startswith("error: invalid JobRequest: parameters: "), line
        with pytest.raises(ValueError, match="safe integer"):
            canonical_json(strict_json(value))


@PROPERTY
@given(text=FREE_TEXT | st.from_regex(r"[0-9a-f]{32}", fullmatch=True))
def test_a_job_uid_is_sent_exactly_when_it_is_one(files: Files, text: str) -> None:
    line = refused(parjobs("status", "--key", files.key, "--", text))
    assert (line == BROKER) == bool(re.fullmatch(r"[0-9a-f]{32}", text))


@PROPERTY
@given(text=FREE_TEXT | st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True))
def test_an_account_is_looked_up_exactly_when_it_is_a_name(text: str) -> None:
    line = refused(parjobs("account", "balance", "--", text))
    assert (line == STORE) == bool(re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", text))


@PROPERTY
@given(text=FREE_TEXT | st.decimals(allow_nan=True).map(str))
def test_any_max_spend_writes_a_cheque_or_is_refused(files: Files, text: str) -> None:
    result = parjobs(
        *("cheque", "write", "--key", files.key, "--resource", FINGERPRINT),
        *("--max-spend", text),
    )
    assert result.exit_code in (0, 2), result.stderr
    assert "Traceback" not in result.stderr
    if result.exit_code == 0:
        assert float(json.loads(result.stdout)["max_spend"]) > 0
    else:
        assert refused(result).startswith("error: Invalid value for '--max-spend': ")


@PROPERTY
@given(text=FREE_TEXT | st.integers().map(str))
def test_any_lifetime_is_sent_or_refused_in_one_line(files: Files, text: str) -> None:
    line = refused(parjobs(*_submit(files, "--lifetime", text)))
    assert line == BROKER or line.startswith("error: Invalid value for '--lifetime': ")
