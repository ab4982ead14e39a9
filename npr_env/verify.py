"""Answer extraction and equivalence checking, with a time budget counted in work, not wall time.

``verify(prediction_text, gold)`` takes the last ``\\boxed{...}`` of the prediction and asks whether it equals
the gold answer. Two stages:

1. A fast path in this process: normalized string equality (``\\left``/``\\right``, ``\\dfrac``, ``\\text{}``,
   degrees, thousands separators, spaces that separate nothing ...), exact numbers and fractions,
   multiple-choice letters. It settles most rollouts (the procedural tasks' integer answers always) without any
   IPC. A space between two digits is kept: ``2 3`` is not ``23``.
2. math-verify, gold first (``verify(parse(gold), parse(pred))``: the check is asymmetric), in a small pool of
   persistent worker *subprocesses*. math-verify's own timeouts use ``signal.alarm``, which fails outside the
   main thread, so they are switched off (``parsing_timeout=None``, ``timeout_seconds=None``) and the budget
   is ours. Plain ``subprocess`` rather than ``multiprocessing``: it works from threads, from daemonic worker
   processes (which may not have multiprocessing children) and after ``fork``.

The gold. A gold that holds several ``\\boxed{}`` (a multi-part answer, ``\\boxed{1} papers and \\boxed{2}
bins``) is the comma list of all of them, ``1, 2``, which math-verify reads as the set ``{1, 2}``, as its own
``parse`` does for several boxes: a prediction must give every part (in any order), and the last part alone is
not the answer. A prediction is judged on its *last* box only (the prompt asks for one final ``\\boxed{}``).

The budget (``timeout``, default 5) is **CPU seconds of work**, so a verdict never depends on what else runs
on the machine:

* extraction and the fast path run in the caller's thread and are charged at their thread CPU time
  (``time.thread_time``); they are linear in the response length (100 KB of unterminated boxes: milliseconds);
* the rest of the budget goes to math-verify. A worker imports and warms math-verify once, then judges every
  request in a *fork* of itself, so each request starts from the same warm state (its cost never depends on
  the requests before it: sympy's caches, lazily built tables) and is charged at its own process CPU time:
  an ``ITIMER_PROF`` timer (it counts CPU time, not the clock) raises when the budget is spent, and a result
  that took more than the budget is ``False`` whatever it was. math-verify stuck inside one long C call (a
  huge integer power) cannot take a Python signal, so an ``ITIMER_VIRTUAL`` timer ends the fork
  ``CPU_GRACE`` CPU seconds later (SIGVTALRM's default action), and ``RLIMIT_CPU`` a second after that.
* A wall-clock safety net, ``max(WALL_SAFETY_MIN, WALL_SAFETY_FACTOR * timeout)`` seconds (50 s for the
  default budget), much larger than any CPU budget, is there only for a *hung* request (one that waits
  without computing); under any realistic load a request spends its CPU budget long before that. The parent
  waits 10 s longer than that for the worker itself, and replaces a worker that hangs or dies.

So a case that needs 2 CPU seconds gets the same verdict alone or beside busy processes (where the wall
clock gives 4 s or more), and the same verdict first or after any other request; the only noise left is
that of the kernel's CPU accounting, which matters only for a case within a few percent of the budget.
Every model-output input gets a deterministic verdict: over budget, a crash, or any exception is ``False``.
The budget counts from the moment the request reaches a *ready* worker, so a cold start (importing sympy,
about 1 s) never turns a right answer into a timeout. POSIX only (``select`` on pipes, ``fork``, ``setitimer``).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

from .schema import boxed_answers, last_boxed

# Answers longer than this are not answers (and only feed the parser's worst cases): False, no parsing.
MAX_ANSWER_CHARS = 2000
# How long a new worker may take to import math-verify and warm up before we call it broken.
STARTUP_TIMEOUT = 60.0
# CPU seconds a request may run past its budget (it normally stops itself at the budget) before the kernel ends it.
CPU_GRACE = 0.25
# The largest CPU budget a request gets (a larger or infinite ``timeout`` is this), about 11 days.
MAX_BUDGET = 1e6
# Wall-clock safety net for a hung worker only: max(WALL_SAFETY_MIN, WALL_SAFETY_FACTOR * budget) seconds.
WALL_SAFETY_MIN = 30.0
WALL_SAFETY_FACTOR = 10.0
# Worker memory cap (address space), so that `\\boxed{9^{9^{9^9}}}` fails fast instead of eating the machine.
MAX_WORKER_MEM_MB = int(os.environ.get("NPR_VERIFY_MAX_MEM_MB", "3072"))


def extract_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces kept), or None when there is none."""
    if not isinstance(text, str):
        return None
    return last_boxed(text)


# -- normalization and the fast path --------------------------------------------------------------------------
_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_DROP = re.compile(r"\\left|\\right|\\displaystyle|\$")
_THIN = re.compile(r"\\[!,;:> ]|~")  # LaTeX spacing: typography, never a separator (``1\\,000`` is 1000)
_DEGREES = re.compile(r"\^\s*(?:\{\s*)?\\circ\s*\}?|\\circ|°|\\degree|(?<![a-z])degrees?(?![a-z])", re.I)
_SPACE = re.compile(r"\s+")
_LONE_SPACE = re.compile(r" (?!\d)|(?<!\d) ")  # a space that does not stand between two digits
_NUM = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_FRAC = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}|([+-]?)\\frac(\d)(\d)|([+-]?\d+)/([+-]?\d+)")
_CHOICE = re.compile(r"\(?([A-E])\)?")
_CHOICE_PRED = re.compile(r"\(([A-Ea-e])\)|([A-Ea-e])\)?")


def normalize(answer: str) -> str:
    """A canonical string form of an answer, for exact-match comparison (not a math canonical form)."""
    s = answer.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",").replace("\\%", "%")
    s = s.replace("\\$", "")
    s = re.sub(r"\\([lg])e(?![a-zA-Z])", r"\\\1eq", s)
    for _ in range(3):  # unwrap \text{...} and friends, innermost first
        s2 = _WRAPPERS.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    s = _DROP.sub(" ", s)
    s = _THIN.sub("", s)
    s = _DEGREES.sub("", s)
    # Spaces go, except one between two digits: "x + 1" is "x+1", but "2 3" is not "23".
    s = _LONE_SPACE.sub("", _SPACE.sub(" ", s))
    return s.rstrip(".")  # sentence punctuation: "5." is 5


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, exact) for a plain number or fraction in normalized form; exact is False for decimals."""
    m = _NUM.fullmatch(s)
    if m:
        try:
            return Fraction(s.replace(",", "")), "." not in s
        except (ValueError, ZeroDivisionError):
            return None
    m = _FRAC.fullmatch(s)
    if m:
        g = m.groups()
        if g[1] is not None:
            sign, a, b = g[0], g[1], g[2]
        elif g[4] is not None:
            sign, a, b = g[3], g[4], g[5]
        else:
            sign, a, b = "", g[6], g[7]
        if int(b) == 0:
            return None
        v = Fraction(int(a), int(b))
        return (-v if sign == "-" else v), True
    return None


def _choice(s: str) -> str | None:
    """The letter of a multiple-choice gold answer such as ``B``, ``(B)`` or ``\\text{(B)}``."""
    m = _CHOICE.fullmatch(s)
    return m.group(1) if m else None


def _pred_choice(s: str) -> str | None:
    """The letter a prediction picks: ``B``, ``b``, ``(B)``, ``(B) 5`` or ``\\textbf{(B)}~5``."""
    m = _CHOICE_PRED.match(s)
    if not m:
        return None
    if m.group(1):
        return m.group(1).upper()
    return m.group(2).upper() if m.end() == len(s) else None


_TUPLE = re.compile(r"\(([^()\[\]{}]*,[^()\[\]{}]*)\)")
_THREE_DIGITS = re.compile(r"\d{3}")


def _tuple_verdict(p: str, g: str) -> bool | None:
    """Two ordered tuples of exact numbers in normalized form, such as ``(40,28,25,22)``: equal when they have the
    same length and equal elements, else not (math-verify's verdict for them; it never reorders a tuple). None for
    anything else, and where ``(1,000)`` could be one number with a thousands separator (an element of exactly
    three digits after a comma), or an element is a decimal."""
    mp, mg = _TUPLE.fullmatch(p), _TUPLE.fullmatch(g)
    if mp is None or mg is None:
        return None
    ps, gs = mp.group(1).split(","), mg.group(1).split(",")
    if any(_THREE_DIGITS.fullmatch(x) for x in ps[1:] + gs[1:]):
        return None
    a, b = [_as_number(x) for x in ps], [_as_number(x) for x in gs]
    if any(x is None or not x[1] for x in a + b):
        return None
    return len(a) == len(b) and all(x[0] == y[0] for x, y in zip(a, b))


def fast_verdict(pred: str, gold: str) -> bool | None:
    """True/False when the answers can be judged without math-verify, else None.

    Only returns False when the verdict is certain: both are exact numbers (integers or fractions), or the
    gold is a choice letter and the prediction picks a letter or is a number.
    """
    p, g = normalize(pred), normalize(gold)
    if not p:
        return False
    if p == g:
        return True
    letter = _choice(g)
    if letter is not None:
        picked = _pred_choice(p)
        if picked is not None:
            return picked == letter
        if _as_number(p) is not None and not re.search(r",\s", pred):
            return False
        return None
    tup = _tuple_verdict(p, g)
    if tup is not None:
        return tup
    # AoPS writes AIME answers as \textbf{(073)}: a lone number in parentheses is that number.
    inner = re.fullmatch(r"\(([^(),]+)\)", p)
    if inner and _as_number(inner.group(1)) is not None:
        p = inner.group(1)
    # "1,000" is a thousands separator, "92, 102" is a list: decide on the raw text, before spaces are dropped.
    a = None if re.search(r",\s", pred) else _as_number(p)
    b = None if re.search(r",\s", gold) else _as_number(g)
    if a is not None and b is not None:
        if a[0] == b[0]:
            return True
        if a[1] and b[1]:
            return False
    return None


def _clean_gold(gold) -> str:
    """The gold as an answer string. A gold holding boxes (a whole solution, or a multi-part answer) is its
    boxes: one box is its content, several are the comma list of all of them (math-verify's set of the boxed
    answers), never just the last one."""
    if isinstance(gold, float) and gold.is_integer():
        gold = int(gold)
    gold = str(gold)
    if "box" in gold:
        parts = [b.strip() for b in boxed_answers(gold)]
        parts = [b for b in parts if b]
        if parts:
            gold = ", ".join(parts)
    return gold.strip()


# -- math-verify (runs inside a worker) -------------------------------------------------------------------------
def math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict, gold first, with its signal-based timeouts off. NO timeout: call it in a worker."""
    import logging

    from math_verify import parse
    from math_verify import verify as mv_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timeouts are off

    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not g or not p:
        return False
    return bool(mv_verify(g, p, timeout_seconds=None))


# Warm-up pairs a worker runs once at start, before it forks anything: imports, grammars and sympy's lazily built
# tables for the common answer kinds, so that no request pays them (every request runs in a fresh fork of the
# warm worker, whose state never changes).
_WARMUP = (
    ("\\frac{1}{2}", "0.5"), ("\\sqrt{8}", "2\\sqrt{2}"), ("(x+1)^2", "x^2+2x+1"), ("[1,2)", "[1,2)"),
    ("\\{1,2\\}", "1,2"), ("x=2", "2"), ("\\log_2 8", "3"), ("10\\%", "0.1"), ("\\sin^2 x+\\cos^2 x", "1"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\int_0^1 x\\,dx", "\\frac12"), ("\\lim_{x\\to 0} \\frac{\\sin x}{x}", "1"), ("\\sum_{k=1}^{3} k", "6"),
)


class _OverBudget(BaseException):
    """Raised inside a request's process when it has spent its CPU budget (a BaseException, so that the
    libraries' ``except Exception`` blocks cannot swallow it)."""


_cpu_deadline: float | None = None  # in a request's process: its CPU time at which the budget is spent


def _on_cpu_timer(signum, frame) -> None:
    if _cpu_deadline is not None and time.process_time() >= _cpu_deadline:
        raise _OverBudget


def _judge(pred: str, gold: str, budget: float) -> bool:
    """math-verify's verdict within ``budget`` CPU seconds of this process; over it, False. Runs in the fork."""
    global _cpu_deadline
    import resource
    import signal

    # The kernel's limits, in CPU time of this process (a fork starts at 0): SIGVTALRM (default action: end the
    # process) CPU_GRACE after the budget, for math-verify stuck in one long C call that cannot take a Python
    # signal; RLIMIT_CPU (SIGXCPU) a second later as the last word.
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = math.ceil(budget + CPU_GRACE) + 1
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ValueError, OSError):
        pass
    signal.signal(signal.SIGVTALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_VIRTUAL, budget + CPU_GRACE)
    start = time.process_time()
    ok = False
    try:
        _cpu_deadline = start + budget
        # ITIMER_PROF counts this process's CPU time (user + system), never the clock. It ticks again every
        # 10 ms of CPU after the first time, in case a library swallows the first exception.
        signal.setitimer(signal.ITIMER_PROF, max(budget, 1e-3), 0.01)
        ok = math_verify_equal(pred, gold)
    except BaseException:  # noqa: BLE001 - over budget, RecursionError, MemoryError, sympy errors: "not equal"
        ok = False
    _cpu_deadline = None  # later ticks do nothing (the process ends right after this)
    return bool(ok) and time.process_time() - start <= budget


def _run_forked(pred: str, gold: str, budget: float) -> bool:
    """Judge one request in a fork of this (warm) worker, so that every request starts from the same state:
    its CPU time, and so its verdict, never depends on the requests before it (sympy's caches, lazily built
    tables) or on what else runs on the machine. The fork is ended if it runs past ``budget`` (see ``_judge``)."""
    import select as _select
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the request's process: never returns
        code = 0
        try:
            os.close(r)
            _set_pdeathsig()
            ok = _judge(pred, gold, budget)
            os.write(w, b"1" if ok else b"0")
        except BaseException:  # noqa: BLE001 - a late timer tick: no verdict written means False
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    deadline = time.monotonic() + _wall_net(budget)  # a fork that waits without computing (hung)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = _select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return data == b"1"


_prctl = None  # worker only: libc's prctl, looked up once before any fork


def _find_prctl():
    global _prctl
    try:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except Exception:  # noqa: BLE001 - not Linux: the CPU limits still end a busy fork
        _prctl = None


def _set_pdeathsig() -> None:
    """Linux: end this fork if its worker dies (so that a killed worker never leaves a request running)."""
    if _prctl is not None:
        try:
            _prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except Exception:  # noqa: BLE001
            pass


def _wall_net(budget: float) -> float:
    """The wall-clock safety net for a budget of ``budget`` CPU seconds: only a hung process ever reaches it."""
    return max(WALL_SAFETY_MIN, WALL_SAFETY_FACTOR * budget)


def _worker_main() -> None:
    """Worker loop: one JSON request per line on stdin (``[id, pred, gold, cpu_budget_s]``), ``id 0|1`` out.

    The worker warms up once, then judges every request in a fork of itself (``_run_forked``)."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
    try:
        import gc
        import logging
        import resource
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which owns our lifetime
        signal.signal(signal.SIGPROF, _on_cpu_timer)
        logging.disable(logging.CRITICAL)
        if MAX_WORKER_MEM_MB > 0:
            lim = MAX_WORKER_MEM_MB * 2**20
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard == resource.RLIM_INFINITY or hard > lim:
                resource.setrlimit(resource.RLIMIT_AS, (lim, hard))
        try:  # a fork ended by RLIMIT_CPU (SIGXCPU) writes no core file
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        except (ValueError, OSError):
            pass
        for p, g in _WARMUP:
            try:
                math_verify_equal(p, g)
            except Exception:  # noqa: BLE001 - a warm-up pair is an optimisation, not a requirement
                pass
        math_verify_equal("\\frac{1}{2}", "0.5")  # but math-verify itself must work
        _find_prctl()
        gc.collect()
        gc.freeze()  # the warm state is shared by every fork: keep the collector from touching (copying) it
    except BaseException as e:  # noqa: BLE001 - report any start-up failure to the parent
        out.write(("error " + json.dumps(f"{type(e).__name__}: {e}") + "\n").encode())
        return
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        try:
            rid, pred, gold, budget = json.loads(line)
            budget = float(budget)
        except Exception:
            continue
        try:
            ok = _run_forked(pred, gold, budget)
        except BaseException:  # noqa: BLE001 - cannot fork (memory, process limit): no verdict but False
            ok = False
        out.write(f"{rid} {int(ok)}\n".encode())


# The worker imports this module (and so the npr_env package, which should stay light to import).
_BOOT = """
import sys
try:
    from npr_env.verify import _worker_main
except BaseException as e:
    sys.stdout.write("error " + repr(f"{type(e).__name__}: {e}") + "\\n")
    sys.stdout.flush()
    raise SystemExit(1)
_worker_main()
"""


class VerifierError(RuntimeError):
    """The verifier's worker could not start (an environment problem, never a verdict on model output)."""


class _Worker:
    def __init__(self):
        root = str(Path(__file__).resolve().parents[1])  # importable even when npr is not pip-installed
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.next_id = 0

    def _readline(self, deadline: float) -> bytes | None:
        """A line from the worker, or None at the deadline; raises EOFError when the worker died."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def poll_ready(self) -> bool:
        """Non-blocking: has the worker finished starting? (A failed start is left for wait_ready to report.)"""
        if b"\n" not in self.buf:
            try:
                r, _, _ = select.select([self.fd], [], [], 0)
                if r:
                    chunk = os.read(self.fd, 65536)
                    if not chunk:
                        return True  # dead: let wait_ready raise on it
                    self.buf += chunk
            except (OSError, ValueError):
                return True
        return b"\n" in self.buf

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            line = self._readline(time.monotonic() + STARTUP_TIMEOUT)
        except EOFError:
            line = b"error \"the worker exited during start-up\""
        if line is None or line != b"ready":
            self.kill()
            why = "timed out" if line is None else line.decode(errors="replace")
            raise VerifierError(f"the math-verify worker did not start ({why})")
        self.ready = True

    def call(self, pred: str, gold: str, budget: float) -> bool | None:
        """The verdict within ``budget`` CPU seconds of work, or None when the worker hung or died (it must then
        be replaced). The request's own process stops at the budget and the answer is then False; the wait here
        is bounded only by the wall-clock safety net, a little longer than the worker's own."""
        self.wait_ready()
        rid = self.next_id
        self.next_id += 1
        req = json.dumps([rid, pred, gold, budget]) + "\n"
        deadline = time.monotonic() + _wall_net(budget) + 10.0
        try:
            self.proc.stdin.write(req.encode())
            self.proc.stdin.flush()
            while True:
                line = self._readline(deadline)
                if line is None:
                    return None
                got, _, ok = line.decode().partition(" ")
                if got == str(rid):
                    return ok == "1"
        except (OSError, EOFError, ValueError):
            return None

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass


class _Pool:
    """Up to ``size`` persistent workers; a worker that runs over is killed and replaced right away.

    An idle worker that has finished starting up is preferred over one still importing, so a replacement
    started after a timeout does not delay the next call while a warm worker is free.
    """

    def __init__(self, size: int):
        self.size = size
        self.cond = threading.Condition()
        self.idle: list[_Worker] = []
        self.count = 0
        self.all: set[_Worker] = set()

    def _acquire(self) -> _Worker:
        with self.cond:
            while True:
                for w in reversed(self.idle):
                    if w.ready or w.poll_ready():
                        self.idle.remove(w)
                        return w
                if self.count < self.size:
                    self.count += 1
                    break
                if self.idle:
                    return self.idle.pop()
                self.cond.wait()
        try:
            w = _Worker()
        except Exception:
            with self.cond:
                self.count -= 1
                self.cond.notify()
            raise
        with self.cond:
            self.all.add(w)
        return w

    def _release(self, w: _Worker) -> None:
        with self.cond:
            self.idle.append(w)
            self.cond.notify()

    def _drop(self, w: _Worker, replace: bool) -> None:
        w.kill()
        fresh = None
        if replace:
            try:
                fresh = _Worker()  # starts importing now, so it is (nearly) ready when next needed
            except Exception:  # noqa: BLE001 - cannot spawn now: shrink the pool, a later acquire retries
                fresh = None
        with self.cond:
            self.all.discard(w)
            if fresh is None:
                self.count -= 1
            else:
                self.all.add(fresh)
                self.idle.append(fresh)
            self.cond.notify()

    def call(self, pred: str, gold: str, timeout: float) -> bool:
        w = self._acquire()
        try:
            ok = w.call(pred, gold, timeout)
        except VerifierError:
            self._drop(w, replace=False)
            raise
        except BaseException:
            self._drop(w, replace=True)
            raise
        if ok is None:
            self._drop(w, replace=True)
            return False
        self._release(w)
        return ok

    def close(self) -> None:
        with self.cond:
            workers, self.all, self.idle, self.count = list(self.all), set(), [], 0
        for w in workers:
            w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
POOL_SIZE = int(os.environ.get("NPR_VERIFY_WORKERS", "0")) or max(1, min(4, os.cpu_count() or 1))


def _pool() -> _Pool:
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = _Pool(POOL_SIZE)
    return _POOL


def _after_fork() -> None:
    # A forked child must not talk to its parent's workers (their pipes are shared); it starts its own pool.
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


def warmup() -> None:
    """Start every worker of the pool and wait until each is ready (e.g. before timing, or at trainer start)."""
    pool = _pool()
    held = [pool._acquire() for _ in range(pool.size)]  # all of them at once, so each one starts
    error = None
    for w in held:
        try:
            w.wait_ready()
        except VerifierError as e:
            pool._drop(w, replace=False)
            error = error or e
        else:
            pool._release(w)
    if error is not None:
        raise error


def shutdown() -> None:
    """Stop the worker processes (they also stop on their own when this process exits)."""
    if _POOL is not None:
        _POOL.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
atexit.register(shutdown)


# -- public API ---------------------------------------------------------------------------------------------------
def _prepare(prediction_text, gold, fast: bool = True) -> tuple[str, str] | bool:
    """(pred answer, gold) for the slow path, or the verdict when it is already known."""
    if not isinstance(prediction_text, str):
        return False
    pred = extract_answer(prediction_text)
    if pred is None:
        return False
    pred = pred.strip()
    gold = _clean_gold(gold)
    if not pred or not gold or len(pred) > MAX_ANSWER_CHARS:
        return False
    if not fast:
        return pred, gold
    try:
        known = fast_verdict(pred, gold)
    except Exception:  # noqa: BLE001 - the fast path must never decide by crashing
        known = None
    return known if known is not None else (pred, gold)


def _prepare_charged(prediction_text, gold, fast: bool, timeout: float | None) -> tuple[tuple[str, str] | bool, float]:
    """``_prepare`` and the CPU budget left after it: extraction and the fast path count against ``timeout``
    (at this thread's CPU time), so the budget covers everything the verifier does."""
    t0 = time.thread_time()
    prep = _prepare(prediction_text, gold, fast)
    if timeout is None or timeout <= 0:  # no budget at all / the fast path alone
        return prep, (math.inf if timeout is None else 0.0)
    left = float(timeout) - (time.thread_time() - t0)
    if left <= 0:
        return False, 0.0  # the budget went on extraction alone: over budget, whatever the fast path said
    return prep, min(left, MAX_BUDGET)


def answers_match(pred: str, gold: str, timeout: float | None = 5.0) -> bool:
    """Whether a bare answer string (no ``\\boxed``) equals the gold; ``timeout=None`` runs in-process."""
    return verify("\\boxed{" + str(pred) + "}", gold, timeout=timeout)


def verify(prediction_text: str, gold: str, timeout: float | None = 5.0, fast: bool = True) -> bool:
    """Whether the last ``\\boxed{}`` of ``prediction_text`` equals ``gold``; False without a box.

    ``timeout`` is the budget in **CPU seconds** (extraction, the fast path and math-verify together; see the
    module docstring); over it, the verdict is False, however busy the machine is. ``timeout=None`` runs
    math-verify in this process with no budget at all: only for trusted inputs; ``timeout=0`` gives the fast
    path's verdict alone (False where only math-verify could tell). ``fast=False`` skips the fast path (every
    pair goes to math-verify; for tests and debugging).
    """
    prep, left = _prepare_charged(prediction_text, gold, fast, timeout)
    if isinstance(prep, bool):
        return prep
    pred, gold = prep
    if timeout is None:
        try:
            return math_verify_equal(pred, gold)
        except Exception:  # noqa: BLE001
            return False
    if timeout <= 0:
        return False
    return _pool().call(pred, gold, left)


def verify_many(predictions: Sequence[str], golds: Sequence[str], timeout: float | None = 5.0,
                fast: bool = True) -> list[bool]:
    """``verify`` over a batch; the ones the fast path cannot settle run on all workers at once.

    Each pair has its own budget of ``timeout`` CPU seconds, exactly as in ``verify``."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answers")
    out: list[bool | None] = []
    slow: list[int] = []
    preps = []
    for p, g in zip(predictions, golds):
        prep, left = _prepare_charged(p, g, fast, timeout)
        preps.append((prep, left))
        if isinstance(prep, bool):
            out.append(prep)
        else:
            out.append(None)
            slow.append(len(out) - 1)
    if not slow:
        return out  # type: ignore[return-value]
    if timeout is None:
        for i in slow:
            try:
                out[i] = math_verify_equal(*preps[i][0])
            except Exception:  # noqa: BLE001
                out[i] = False
        return out  # type: ignore[return-value]
    if timeout <= 0:
        return [bool(x) for x in out]
    pool = _pool()
    if len(slow) == 1:
        (pred, gold), left = preps[slow[0]]
        out[slow[0]] = pool.call(pred, gold, left)
        return out  # type: ignore[return-value]
    with ThreadPoolExecutor(max_workers=min(pool.size, len(slow))) as ex:
        verdicts = list(ex.map(lambda i: pool.call(preps[i][0][0], preps[i][0][1], preps[i][1]), slow))
    for i, v in zip(slow, verdicts):
        out[i] = v
    return out  # type: ignore[return-value]


__all__ = ["VerifierError", "answers_match", "extract_answer", "fast_verdict", "math_verify_equal", "normalize",
           "shutdown", "verify", "verify_many", "warmup"]
