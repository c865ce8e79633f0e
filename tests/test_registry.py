import hashlib

import pytest

from worker.registry import DedupeRegistry, format_keys


def key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_journal_survives_a_new_instance(tmp_path):
    journal = tmp_path / "run" / "registry.journal"
    reg = DedupeRegistry(journal)
    assert len(reg) == 0 and key(0) not in reg
    reg.add([key(0), key(1)])
    reg.add([key(1), key(2), key(2)])  # repeats are recorded once
    assert key(1) in reg and len(reg) == 3
    # No close(): a crashed worker does not close its files either.
    again = DedupeRegistry(journal)
    assert set(again) == {key(0), key(1), key(2)}
    assert journal.read_text().splitlines() == [key(0), key(1), key(2)]
    reg.close()
    again.close()


def test_torn_last_line_is_dropped(tmp_path):
    journal = tmp_path / "registry.journal"
    journal.write_text(f"{key(0)}\n{key(1)[:20]}")  # a crash in the middle of a write
    with DedupeRegistry(journal) as reg:
        assert set(reg) == {key(0)}
        reg.add([key(2)])
    assert journal.read_text() == f"{key(0)}\n{key(2)}\n"


def test_load_a_checkpoints_registry(tmp_path):
    with DedupeRegistry(tmp_path / "journal") as reg:
        reg.add([key(i) for i in range(5)])
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "registry.txt").write_text(format_keys(reg))

    with DedupeRegistry(tmp_path / "new-run" / "journal") as fresh:
        fresh.add([key(9)])
        assert fresh.load(tmp_path / "ckpt" / "registry.txt") == 5
        assert fresh.load(tmp_path / "ckpt" / "registry.txt") == 0
        assert set(fresh) == {key(i) for i in range(5)} | {key(9)}
        # load() merges in memory; the journal only records what this run trained.
        assert (tmp_path / "new-run" / "journal").read_text() == f"{key(9)}\n"


def test_in_memory_registry_and_bad_keys(tmp_path):
    reg = DedupeRegistry(None)
    reg.add([key(0)])
    assert key(0) in reg and len(reg) == 1
    for bad in ("", "two words", "line\nbreak", 3):
        with pytest.raises(ValueError):
            reg.add([bad])
    assert len(reg) == 1
