"""The kept worker's output framing (pipeline_lib/generation/warm.py), read in chunks of every size: the job's own
output reaches the caller whole and newline-terminated, the end line's JSON is the result, the next job's output is
left for the next call."""

from __future__ import annotations

import types

import pytest

from pipeline_lib.generation.vllm_worker import JOB_END
from pipeline_lib.generation.warm import KeptWorker


class Chunks:
    def __init__(self, data: bytes, size: int):
        self.data, self.size = data, size

    def read1(self, n: int) -> bytes:
        out, self.data = self.data[:min(n, self.size)], self.data[min(n, self.size):]
        return out


def _reader(data: bytes, size: int) -> KeptWorker:
    w = object.__new__(KeptWorker)
    w.proc, w._pending = types.SimpleNamespace(stdout=Chunks(data, size)), b""
    return w


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(JOB_END), len(JOB_END) + 1, 4096])
@pytest.mark.parametrize("output, shown", [
    (b"Processed prompts: 6/6\r", b"Processed prompts: 6/6\r\n"),  # a bar without newline: one is added
    (b"log line\n", b"log line\n"),  # already ended: nothing added
    (b"", b""),  # quiet: nothing at all
])
def test_job_output_and_result_framed(size, output, shown):
    stream = output + b"\n" + JOB_END + b'{"ok": true}\n' + b"next job" + b"\n" + JOB_END + b'{"ok": false}\n'
    w, got = _reader(stream, size), []
    assert w._read_until_end(got.append) == {"ok": True}
    assert b"".join(got) == shown
    later = []  # bytes read past the first end line belong to the next call
    assert w._read_until_end(later.append) == {"ok": False} and b"".join(later) == b"next job\n"


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_worker_gone_before_its_end_line(size):
    w, got = _reader(b"Traceback ...\nKilled", size), []
    assert w._read_until_end(got.append) is None
    assert b"".join(got) == b"Traceback ...\nKilled"
    half = _reader(b"out\n" + JOB_END + b'{"ok": tr', size)  # killed while writing its end line
    assert half._read_until_end(lambda b: None) is None
