"""The file engine under both soft-target stores: rows written in any order (as ranks write their shares) make the
same file and checksums as rows streamed in order; a damaged file is told apart; progress ranges add up."""

import numpy as np
import pytest

from darkknowledge import store_files
from darkknowledge.errors import DarkKnowledgeError

SPECS = {"values": ("<f2", (10, 3)), "indices": ("<u2", (10, 3)), "tail": ("<f4", (10, 2))}


def rows(first, stop):
    n = np.arange(first, stop)
    return {"values": np.stack([n, n + 0.5, n + 0.25], 1), "indices": np.stack([n, 2 * n, 3 * n], 1),
            "tail": np.stack([-n, n / 8], 1)}


def test_rows_written_out_of_order_make_the_file_streamed_in_order(tmp_path):
    streamed = store_files.Writer(SPECS, tmp_path / "streamed.bin")
    for first in range(0, 10, 4):
        streamed.append(rows(first, min(first + 4, 10)))
    meta, in_memory = streamed.finish(10)
    assert in_memory is None and not list(tmp_path.glob(".*.tmp"))  # renamed into place
    assert (tmp_path / "streamed.bin").stat().st_size == streamed.total_bytes
    assert all(entry["offset"] % store_files.ALIGN == 0 for entry in meta.values())

    shared = tmp_path / "shared.bin"
    for first, stop in ((6, 10), (0, 3), (3, 6)):  # three ranks, the last first
        with store_files.RowFiles.one_file(SPECS, shared) as files:
            assert files.write(first, rows(first, stop)) == stop - first
            files.sync()
    with open(shared, "r+b") as f:
        f.truncate(streamed.total_bytes)
        assert store_files.arrays_meta(SPECS, store_files.checksums(f, SPECS)) == meta
    assert shared.read_bytes() == (tmp_path / "streamed.bin").read_bytes()

    arrays, mapping = store_files.map_arrays(shared, meta, verify=True, what="test store")
    np.testing.assert_array_equal(arrays["indices"], rows(0, 10)["indices"])
    del arrays
    mapping.close()
    data = bytearray(shared.read_bytes())
    data[meta["tail"]["offset"] + 5] ^= 1
    shared.write_bytes(bytes(data))
    with pytest.raises(DarkKnowledgeError, match="array tail does not match the checksum"):
        store_files.map_arrays(shared, meta, verify=True, what="test store")


def test_per_array_files_are_written_in_place_and_a_short_one_is_found(tmp_path):
    store_files.create_array_files(tmp_path, SPECS)
    assert store_files.array_files_problem(tmp_path, SPECS) is None
    with store_files.RowFiles.per_array(SPECS, tmp_path) as files:
        files.write(5, rows(5, 10))
        files.write(0, rows(0, 5))
        files.sync()
    arrays = store_files.map_array_files(tmp_path, SPECS)
    for name, expected in rows(0, 10).items():
        np.testing.assert_array_equal(arrays[name], expected.astype(SPECS[name][0]))
    with pytest.raises(DarkKnowledgeError, match="more than the 10 cases"):
        with store_files.RowFiles.per_array(SPECS, tmp_path) as files:
            files.write(8, rows(0, 3))
    (tmp_path / "tail.bin").write_bytes(b"short")
    assert store_files.array_files_problem(tmp_path, SPECS) == "tail.bin is missing or truncated"


def test_progress_ranges_merge_and_count():
    done = store_files.merged([[4, 6], [0, 2], [2, 3], [5, 9], [9, 9]])
    assert done == [[0, 3], [4, 9]] and store_files.count(done) == 8
    assert store_files.missing(done, 12) == [[3, 4], [9, 12]]


def test_a_rank_progress_file_out_of_range_or_damaged_counts_nothing(tmp_path):
    from darkknowledge import checkpoint
    path = tmp_path / "rank0.json"
    checkpoint.write_json(path, {"windows_done": [[0, 3], [5, 7]]})
    assert store_files.read_ranges(path, 7, "test store") == [[0, 3], [5, 7]]
    assert store_files.read_ranges(path, 6, "test store") == []  # beyond the windows: rows written again
    path.write_text("{not json")
    assert store_files.read_ranges(path, 7, "test store") == []
