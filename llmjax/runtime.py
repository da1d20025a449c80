"""How a command's process runs: its memory allocator and XLA's persistent compilation cache.

Allocator. XLA:CPU allocates a fresh scratch buffer of gigabytes for every training step;
glibc hands it back to the kernel after the step and the next step faults it in again
(about a million page faults and seconds of system time per step on a 2-core machine).
jemalloc told to retain what it maps (MALLOC_CONF below) keeps the pages. A command run as
`python -m llmjax.<command>` on a machine with jemalloc (Debian/Ubuntu: `apt-get install
libjemalloc2`; or LLMJAX_JEMALLOC=/path/to/libjemalloc.so) re-executes itself once, first
thing, with it preloaded: a library cannot swap malloc once a process has allocated.
`LLMJAX_ALLOCATOR=system` keeps glibc's; an LD_PRELOAD the user set is left alone. The
allocator changes where memory comes from, never a result (tests/integration/test_runtime.py
trains with both and compares the losses).

Compilation cache. A command rerun with the same shapes (a resumed run, a second
evaluation, a server restart) loads its compiled programs from
`$LLMJAX_COMPILATION_CACHE` (default ~/.cache/llmjax/xla, at most 4 GiB, least recently
used first out; `off` turns it off) instead of compiling them again: 8 s to 1 s for the
first step of the tests' tiny model on a 2-core CPU, every compilation kept however short.
A JAX_COMPILATION_CACHE_DIR the user set wins. The benchmark turns it off: it measures
compilation.
"""

import os
import sys

JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",  # Debian, Ubuntu
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2")
# retain: keep freed address space mapped; the decays at -1: never purge its pages.
JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
CACHE_MAX_BYTES = 4 << 30


def jemalloc_path() -> str | None:
    chosen = os.environ.get("LLMJAX_JEMALLOC")
    if chosen:
        return chosen if os.path.exists(chosen) else None
    return next((path for path in JEMALLOC_PATHS if os.path.exists(path)), None)


def allocator_env(environ: dict[str, str], allocator: str = "jemalloc") -> dict[str, str]:
    """`environ` for a process that should run on `allocator` (jemalloc or system)."""
    env = {k: v for k, v in environ.items()
           if not (k == "LD_PRELOAD" and "jemalloc" in v)}
    env["LLMJAX_ALLOCATOR"] = allocator
    if allocator == "jemalloc" and (path := jemalloc_path()):
        env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD")) if p)
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def preload_allocator() -> None:
    """Re-executes this process with jemalloc preloaded, if it is a command that should be.

    Called by llmjax/__init__.py while `python -m llmjax.<command>` imports the package,
    before anything large is allocated; does nothing for a library import.
    """
    if (os.environ.get("LLMJAX_ALLOCATOR", "jemalloc") != "jemalloc"
            or os.environ.get("LD_PRELOAD") or sys.platform != "linux"):
        return
    if jemalloc_path() is None:
        return
    env = allocator_env(dict(os.environ))
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def _mapped(name: str) -> bool:
    """Whether a library called `name` is loaded in this process (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return any(name in line for line in maps)
    except OSError:
        return False


def allocator() -> str:
    """What this process allocates with, for the start-up line."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if _mapped("libjemalloc"):
        return f"jemalloc ({os.environ.get('MALLOC_CONF', 'its defaults')}; " \
               "LLMJAX_ALLOCATOR=system for glibc's)"
    if preloaded:
        return f"LD_PRELOAD={preloaded}"
    if os.environ.get("LLMJAX_ALLOCATOR") == "system" or sys.platform != "linux":
        return "the system's"
    return "the system's (apt-get install libjemalloc2 for a faster CPU step)"


def enable_compilation_cache() -> str:
    """Points JAX at the persistent compilation cache; returns where (or "off")."""
    import jax

    if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR, set by the user
        return jax.config.jax_compilation_cache_dir
    where = os.environ.get("LLMJAX_COMPILATION_CACHE",
                           os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                        "llmjax", "xla"))
    if where.lower() in ("off", "0", "none", ""):
        return "off"
    where = os.path.expanduser(where)
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default keeps only compilations over 1 s; the many shorter ones (evaluation,
        # initialisation, sampling) added 2.5 s to a resumed tiny run's first step.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return where


def describe() -> str:
    """The start-up line: the allocator and the compilation cache in effect."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    return (f"Runtime: allocator {allocator()}; XLA compilation cache "
            + (f"{cache} (LLMJAX_COMPILATION_CACHE=off: none)" if cache else "off"))
