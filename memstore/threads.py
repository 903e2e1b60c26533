"""Background threads whose torch ops run without intra-op threads, leaving other threads alone.

A trainer computes on every core with torch's intra-op threads, and the store's client
prepares updates and lookups on background threads beside it. Left alone, each such thread
that runs a torch op on a few thousand rows starts an OpenMP team of its own, and its
sleeping workers are woken for every op: on 2 cores one 8-table update_many cost 15.8 ms of
process CPU this way and 5.4 ms without (bench notes in README). With OpenMP (torch's
backend on Linux) the thread count is a per-thread setting, so `serial_torch()` turns it to
one for the calling thread only; torch's own `set_num_threads` would also change the
default that every thread started later takes.

`serial_torch` is a ThreadPoolExecutor initializer. It first lets torch finish its lazy
per-thread set-up (which would otherwise restore the default afterwards), then sets the
calling thread's OpenMP thread count through the OpenMP runtime torch loaded. Where torch
uses no OpenMP runtime that can be found, it changes nothing and returns False.
"""

from __future__ import annotations

import ctypes
import threading

import torch

_omp = None  # the OpenMP runtime torch loaded (ctypes), False when none was found
_lock = threading.Lock()  # guards _omp's lookup


def _openmp():
    global _omp
    with _lock:
        if _omp is None:
            _omp = False
            try:
                with open("/proc/self/maps") as f:
                    paths = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
            except OSError:
                paths = set()
            for path in sorted(paths):
                try:
                    _omp = ctypes.CDLL(path)  # the library already loaded: the same runtime torch uses
                    _omp.omp_set_num_threads.argtypes = (ctypes.c_int,)
                    break
                except (OSError, AttributeError):
                    _omp = False
        return _omp or None


def serial_torch() -> bool:
    """Makes the calling thread's torch ops single-threaded; returns whether they now are."""
    torch.get_num_threads()  # torch's lazy per-thread init runs now, not after our setting
    omp = _openmp()
    if omp is not None:
        omp.omp_set_num_threads(1)
    return torch.get_num_threads() == 1
