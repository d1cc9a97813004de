"""The nonce store and the user registry on the in-memory store, racing writers included."""

from __future__ import annotations

import uuid

import anyio
import pytest
from pydantic import ValidationError

from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.errors import (
    ObjectNotFoundError,
    ReplayedAuthorisationError,
    UnknownUserError,
    UserExistsError,
)
from orchestrator.store.base import ObjectStore
from orchestrator.store.users import NonceStore, UserRegistry
from tests._forwarding import CountingStore, ForwardingStore

ALICE = KeyPair.generate("alice").public
BOB = KeyPair.generate("bob").public


def new_nonce() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def nonces(store: ObjectStore, prefix: str) -> NonceStore:
    return NonceStore(store, f"{prefix}nonces/")


@pytest.fixture
def users(store: ObjectStore, prefix: str) -> UserRegistry:
    return UserRegistry(store, f"{prefix}users/")


# --- nonces -------------------------------------------------------------------------------------


async def test_a_nonce_is_claimed_once_and_holds_its_holder(
    nonces: NonceStore, store: ObjectStore, prefix: str
) -> None:
    nonce = new_nonce()
    await nonces.claim(ALICE.fingerprint, nonce, holder="job-1")
    assert await store.get(f"{prefix}nonces/{ALICE.fingerprint}/{nonce}") == b"job-1"


async def test_a_replayed_nonce_is_refused_for_ever(nonces: NonceStore) -> None:
    nonce = new_nonce()
    await nonces.claim(ALICE.fingerprint, nonce, holder="job-1")
    for holder in ("job-2", "job-3"):
        with pytest.raises(ReplayedAuthorisationError, match="already used"):
            await nonces.claim(ALICE.fingerprint, nonce, holder=holder)


async def test_the_same_holder_claiming_again_is_a_retry_not_a_replay(nonces: NonceStore) -> None:
    nonce = new_nonce()
    await nonces.claim(ALICE.fingerprint, nonce, holder="job-1")
    await nonces.claim(ALICE.fingerprint, nonce, holder="job-1")
    with pytest.raises(ReplayedAuthorisationError):
        await nonces.claim(ALICE.fingerprint, nonce, holder="job-2")


async def test_nonces_are_per_user(nonces: NonceStore) -> None:
    nonce = new_nonce()
    await nonces.claim(ALICE.fingerprint, nonce, holder="job-1")
    await nonces.claim(BOB.fingerprint, nonce, holder="job-2")


async def test_ten_racing_claims_of_one_nonce_have_exactly_one_winner(
    nonces: NonceStore, store: ObjectStore, prefix: str
) -> None:
    nonce = new_nonce()
    won: list[str] = []
    refused: list[str] = []

    async def claim(holder: str) -> None:
        try:
            await nonces.claim(ALICE.fingerprint, nonce, holder=holder)
        except ReplayedAuthorisationError:
            refused.append(holder)
        else:
            won.append(holder)

    async with anyio.create_task_group() as group:
        for n in range(10):
            group.start_soon(claim, f"job-{n}")
    assert len(won) == 1, won
    assert len(refused) == 9
    stored = await store.get(f"{prefix}nonces/{ALICE.fingerprint}/{nonce}")
    assert stored == won[0].encode()


async def test_racing_retries_of_one_submission_all_succeed(nonces: NonceStore) -> None:
    nonce = new_nonce()
    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(lambda: nonces.claim(ALICE.fingerprint, nonce, holder="job-1"))


@pytest.mark.parametrize(
    ("user", "nonce"),
    [("../" + "a" * 61, "0" * 32), (ALICE.fingerprint, "../x"), (ALICE.fingerprint, "A" * 32)],
    ids=["climbing-user", "climbing-nonce", "upper-case-nonce"],
)
async def test_a_malformed_user_or_nonce_writes_nothing(
    nonces: NonceStore, store: ObjectStore, prefix: str, user: str, nonce: str
) -> None:
    with pytest.raises(ValidationError):
        await nonces.claim(user, nonce, holder="job-1")
    assert await store.list(prefix) == []


async def test_a_claim_must_name_its_holder(nonces: NonceStore) -> None:
    with pytest.raises(ValueError, match="holder"):
        await nonces.claim(ALICE.fingerprint, new_nonce(), holder="")


# --- users --------------------------------------------------------------------------------------


async def test_a_user_is_found_by_name_by_fingerprint_and_listed(users: UserRegistry) -> None:
    alice = await users.add("alice", ALICE)
    bob = await users.add("bob", BOB)
    assert alice.name == "alice"
    assert PublicKeys.from_wire(alice.public_key) == ALICE
    assert await users.get("alice") == alice
    assert await users.by_fingerprint(ALICE.fingerprint) == alice
    assert await users.by_fingerprint(BOB.fingerprint) == bob
    assert await users.list() == [alice, bob]


async def test_adding_the_same_user_again_returns_the_first_record(users: UserRegistry) -> None:
    first = await users.add("alice", ALICE)
    assert await users.add("alice", ALICE) == first


async def test_a_taken_name_with_another_key_is_refused(users: UserRegistry) -> None:
    alice = await users.add("alice", ALICE)
    with pytest.raises(UserExistsError, match="another key"):
        await users.add("alice", BOB)
    assert await users.get("alice") == alice
    with pytest.raises(UnknownUserError):
        await users.by_fingerprint(BOB.fingerprint)


async def test_a_registered_key_under_another_name_is_refused(users: UserRegistry) -> None:
    alice = await users.add("alice", ALICE)
    with pytest.raises(UserExistsError, match="already registered as user 'alice'"):
        await users.add("alias", ALICE)
    with pytest.raises(UnknownUserError):
        await users.get("alias")
    assert await users.by_fingerprint(ALICE.fingerprint) == alice
    assert await users.list() == [alice]


async def test_a_retry_writes_the_index_a_crash_left_unwritten(
    users: UserRegistry, store: ObjectStore, prefix: str
) -> None:
    alice = await users.add("alice", ALICE)
    await store.delete(f"{prefix}users/fingerprints/{ALICE.fingerprint}")  # as if never written
    with pytest.raises(UnknownUserError):
        await users.by_fingerprint(ALICE.fingerprint)
    assert await users.add("alice", ALICE) == alice
    assert await users.by_fingerprint(ALICE.fingerprint) == alice


async def test_an_index_pointing_at_a_user_with_another_key_is_not_trusted(
    users: UserRegistry, store: ObjectStore, prefix: str
) -> None:
    await users.add("alice", ALICE)
    await store.put(f"{prefix}users/fingerprints/{BOB.fingerprint}", b"alice")
    with pytest.raises(UnknownUserError, match="another key"):
        await users.by_fingerprint(BOB.fingerprint)


@pytest.mark.parametrize("name", ["nobody", "Alice", "../alice", ""])
async def test_an_unknown_or_impossible_name_is_an_unknown_user(
    users: UserRegistry, name: str
) -> None:
    await users.add("alice", ALICE)
    with pytest.raises(UnknownUserError):
        await users.get(name)


@pytest.mark.parametrize(
    "fingerprint", [BOB.fingerprint, "../x", ""], ids=["unknown", "climbing", "empty"]
)
async def test_an_unknown_or_impossible_fingerprint_is_an_unknown_user(
    users: UserRegistry, fingerprint: str
) -> None:
    with pytest.raises(UnknownUserError):
        await users.by_fingerprint(fingerprint)


@pytest.mark.parametrize("name", ["Alice", "a/b", "", "-x"])
async def test_an_impossible_name_cannot_be_registered(
    users: UserRegistry, store: ObjectStore, prefix: str, name: str
) -> None:
    with pytest.raises(ValidationError):
        await users.add(name, ALICE)
    assert await store.list(prefix) == []


class Withdrawing(ForwardingStore):
    """Finds nothing at `withdrawn`: a record a listing saw, deleted before it was read (what a
    registration that lost its key's race does)."""

    def __init__(self, store: ObjectStore, withdrawn: str) -> None:
        super().__init__(store)
        self.withdrawn = withdrawn

    async def get(self, key: str) -> bytes:
        if key == self.withdrawn:
            raise ObjectNotFoundError(f"no object at {key!r}")
        return await super().get(key)


async def test_a_record_withdrawn_while_listing_is_left_out(
    users: UserRegistry, store: ObjectStore, prefix: str
) -> None:
    alice = await users.add("alice", ALICE)
    await users.add("bob", BOB)
    async with Withdrawing(store, f"{prefix}users/names/bob.json") as withdrawing:
        assert await UserRegistry(withdrawing, f"{prefix}users/").list() == [alice]


async def test_racing_registrations_of_one_name_have_exactly_one_winner(
    users: UserRegistry,
) -> None:
    keys = [KeyPair.generate(f"k{n}").public for n in range(6)]
    winners: list[PublicKeys] = []

    async def add(key: PublicKeys) -> None:
        try:
            await users.add("alice", key)
        except UserExistsError:
            return
        winners.append(key)

    async with anyio.create_task_group() as group:
        for key in keys:
            group.start_soon(add, key)
    assert len(winners) == 1
    record = await users.get("alice")
    assert PublicKeys.from_wire(record.public_key) == winners[0]
    assert await users.by_fingerprint(winners[0].fingerprint) == record


async def test_racing_registrations_of_one_key_have_exactly_one_winner(
    users: UserRegistry,
) -> None:
    winners: list[str] = []

    async def add(name: str) -> None:
        try:
            await users.add(name, ALICE)
        except UserExistsError:
            return
        winners.append(name)

    async with anyio.create_task_group() as group:
        for n in range(6):
            group.start_soon(add, f"user-{n}")
    assert len(winners) == 1
    record = await users.by_fingerprint(ALICE.fingerprint)
    assert record.name == winners[0]
    assert [user.name for user in await users.list()] == winners


async def test_a_confirmed_user_is_not_read_again(store: ObjectStore, prefix: str) -> None:
    await UserRegistry(store, f"{prefix}users/").add("alice", ALICE)
    async with CountingStore(store) as counting:
        users = UserRegistry(counting, f"{prefix}users/")
        alice = await users.by_fingerprint(ALICE.fingerprint)
        reads = len(counting.gets)
        assert await users.by_fingerprint(ALICE.fingerprint) == alice
        assert await users.get("alice") == alice
    assert reads == 2  # the index, then the record: once
    assert len(counting.gets) == reads
