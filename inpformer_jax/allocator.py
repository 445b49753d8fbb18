"""The process's memory allocator: tcmalloc when the system has it, for XLA:CPU's buffers.

XLA:CPU allocates the buffers of every execution afresh. Under glibc's malloc the large ones
are mapped and unmapped on every call, so each train step starts on fresh pages: 111 k page
faults (435 MiB) per ViT-S/224 batch-8 step, 438 k (1.7 GiB) per ViT-B/392 batch-4 step.
tcmalloc keeps freed memory for the next call; the same steps then fault ~0 times and run
17-23 % faster on a 2-core CPU (benchmarks/README.md, "The allocator"). glibc keeps them only
with every thread in one arena (a thread arena maps any block larger than its 64 MiB heap,
whatever mmap_max says), set by GLIBC_TUNABLES at start-up just the same.

An allocator is chosen when the process starts (LD_PRELOAD), so the command lines call
`use_tcmalloc()` first, before JAX is imported: it re-executes the same command line
(`sys.orig_argv`) once with tcmalloc preloaded, when the library is installed
(Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`) and not already loaded. Without it
nothing changes. INPFORMER_JAX_ALLOCATOR=system keeps the system allocator; =PATH preloads
that tcmalloc (or other malloc) library instead of the one found.
"""

from __future__ import annotations

import os
import sys

ENV = "INPFORMER_JAX_ALLOCATOR"
SYSTEM = "system"
TCMALLOC = "tcmalloc"
# Debian/Ubuntu libtcmalloc-minimal4 / libgoogle-perftools4, Fedora/RHEL gperftools-libs.
_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                 "/usr/lib", "/usr/local/lib")
# tcmalloc writes a line on stderr for every allocation over 1 GiB unless told otherwise;
# a feature cache or a large batch is not news.
_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}


def loaded(maps: str = "/proc/self/maps") -> str | None:
  """Path of the tcmalloc library mapped into this process (`maps`: /proc/PID/maps of
  another), or None."""
  try:
    with open(maps) as f:
      for line in f:
        path = line.split(maxsplit=5)[-1].strip()
        if "libtcmalloc" in os.path.basename(path):
          return path
  except OSError:
    pass
  return None


def find() -> str | None:
  """The installed tcmalloc library's path, or None."""
  for directory in _LIBRARY_DIRS:
    for name in _LIBRARIES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def describe() -> str:
  """The allocator of this process in a few words, for logs and benchmark tables."""
  path = loaded()
  return f"tcmalloc ({path})" if path else "system malloc"


def use_tcmalloc() -> None:
  """Re-executes this command line under tcmalloc, unless it runs under it already, the
  library is not installed, INPFORMER_JAX_ALLOCATOR=system, or this is not Linux.

  Call it first in a command line's `__main__`, before JAX (or anything large) is imported:
  the process is replaced, so whatever ran before it runs again. A library the loader
  refused once (it says why on stderr) is not tried again.
  """
  choice = os.environ.get(ENV, TCMALLOC).strip() or TCMALLOC
  if choice == SYSTEM or not sys.platform.startswith("linux"):
    return
  if choice == TCMALLOC:
    library = find()
  elif os.path.isfile(choice):
    library = os.path.abspath(choice)
  else:
    print(f"error: {ENV}={choice!r} is neither '{TCMALLOC}', '{SYSTEM}' nor a library file; "
          f"unset it or give the path of libtcmalloc_minimal.so.4", file=sys.stderr)
    raise SystemExit(2)  # errors.EXIT_USER_ERROR, without importing the package's modules
  if library is None or loaded() or not sys.executable or not sys.orig_argv:
    return
  preload = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
  if library in preload:
    return  # asked for once already: the loader did not take it
  env = dict(os.environ, LD_PRELOAD=" ".join([library, *preload]))
  for key, value in _QUIET.items():
    env.setdefault(key, value)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
