"""Scheduler: one ``generate`` call. It admits requests, preempts them under KV pressure and batches every
active branch of every running request into one step (continuous batching); the branch life cycle is
``npr_env.branches`` (the same one the orchestrator and the env use), the tensors are the runner's
(``prepare_decode`` / ``prepare_extend``) and the choice of tokens is the :class:`~engine.sampling.Sampler`'s.

What the life cycle means here (``pending`` is the branch's last appended token, not yet fed through the model):

* ``ACTIVE``: the next forward feeds ``pending``; its logits choose the next token, which is appended to the
  branch's cursor. The position of every token is the cursor's ``next_position`` read before the append:
  positions come from the graph's layout rule only.
* A child's forced run (``"N:"`` after ``<step>``) is fed in the same forward as ``pending``, as one row of
  several query tokens: the logits at each of them give the forced tokens' logprobs and, at the last, the first
  free token. (A forced run lies in one trace, so its positions follow ``pending``'s; each is checked against
  the cursor when its token is appended.)
* ``FORKING`` (the fork rule agreed): the next forward caches ``</guideline>`` and its logits give the forced
  ``<step>`` of every child; then each child's block table shares the parent's blocks and ``<step>`` is
  appended to it.
* ``FINISHING`` (a child closed its own ``</step>``): the next forward caches the ``</step>`` (the takeaway must
  see it), and its logits give the logprob of the forced ``<takeaway>``.
* When every sibling is done: the parent's table is extended with the children's blocks (no recompute), and
  ``<takeaway>`` is appended to the parent at ``next_position`` (after the longest step).
* EOS, a stop token the policy chose, the budget, or (optionally) a format violation ends the whole request.

Budget: ``max_new_tokens`` bounds each branch's critical path (the parent's tokens before a fork count for
every child; after a join the parent continues from the longest child); ``max_total_tokens`` bounds the sum
over all branches.

Flow control: a prompt group (``n`` samples) is admitted when the pool can hold its prompt plus a reserve per
sample and leaves one block of headroom per active branch. Before each step the scheduler checks that every
branch can get its next slot; if not, it preempts the most recently admitted request until the step fits:
its blocks go back to the pool and it waits at the head of the queue to start again from its prompt, with its
random generator re-seeded, so a preempted sample is the one it would have been (recompute preemption, as in
vLLM). Only a request that outgrows the pool while alone in it is aborted (finish ``aborted``, ``truncated``);
one whose prompt plus reserve exceeds the whole pool never starts (``NPREngine.generate`` raises), and a group
too big to fit at once is admitted in parts. Forks also need headroom. Every table is released exactly once when its
request ends, whatever the reason, and the pool is checked for leaks at the end of ``generate``.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from npr_env.branches import FINISHING, FORKING, Hooks, Rules, fork_within, never
from npr_env.graph import ExecutionGraph

from .kv_cache import BlockTable
from .request import Branch, Request
from .rollout import Rollout
from .sampling import Sampler, SamplingParams, policy_logprobs


class Scheduler(Hooks):
    """The state of one ``NPREngine.generate`` call; :meth:`run` returns the rollouts in request order."""

    def __init__(self, engine, prompts: list[list[int]], params: SamplingParams, mode: str,
                 stop_on_violation: bool):
        self.engine, self.params, self.mode = engine, params, mode
        self.pool, self.runner = engine.pool, engine.runner
        self.device = self.runner.device
        self.sampler = Sampler(params, self.runner.vocab_size, self.device, engine.vocab.eos_ids)
        self.rules = Rules(
            max_path=params.max_new_tokens, max_total=params.total_budget,
            stop_ids=frozenset(int(t) for t in params.stop_token_ids), stop_on_violation=stop_on_violation,
            # The pool is never consulted: a fork under KV pressure is absorbed by preemption, so the pool size
            # changes speed, never the sample (a declined fork would decode the steps sequentially instead).
            may_fork=fork_within(engine.max_depth, engine.min_fork_budget) if mode == "parallel" else never,
            hooks=self)
        self.steps = 0
        self.preemptions = 0  # requests sent back to the queue under KV pressure (recomputed later)
        self.step_log: list[tuple[int, float]] = []  # (rows, seconds) per step; rows 0 = a prefill
        self.t0 = time.perf_counter()
        self.requests: list[Request] = []
        self.waiting: deque[list[Request]] = deque()
        self.running: list[Request] = []
        self.layout = "parallel" if mode == "parallel" else "sequential"
        for pi, prompt in enumerate(prompts):
            group = []
            for si in range(params.n):
                req = self._request(len(self.requests), pi, si, prompt)
                self.requests.append(req)
                group.append(req)
            self.waiting.append(group)

    def _request(self, index: int, prompt_index: int, sample_index: int, prompt: list[int]) -> Request:
        """A fresh request: an empty graph, and a generator seeded from ``params.seed`` and its index."""
        gen = None
        if self.params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(self.params.seed) + index)
        graph = ExecutionGraph(self.engine.tokenizer, prompt, constraints=self.engine.constraints, layout=self.layout)
        return Request(index, prompt_index, sample_index, graph, self.rules, gen)

    # -- main loop ---------------------------------------------------------------------------------------
    def run(self) -> list[Rollout]:
        tick = time.perf_counter
        try:
            while self.waiting or self.running:
                t0 = tick()
                idle = not self.running  # an idle pool always admits the head of the queue
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                    self._reap()
                    self.step_log.append((0, tick() - t0))
                t0 = tick()
                rows = self._make_room()
                if rows:
                    cap = self.engine.max_batch_rows
                    for a in range(0, len(rows), cap):
                        chunk = [b for b in rows[a:a + cap] if not b.traj.done]
                        if chunk:
                            self._step(chunk)
                    self.steps += 1
                    self._reap()
                    self.step_log.append((len(rows), tick() - t0))
                elif idle and not admitted and self.waiting:
                    raise RuntimeError("scheduler stalled: nothing running and nothing admissible")
        except BaseException:
            for r in self.requests:
                r.end("aborted")
            raise
        self.pool.assert_all_free()
        return [self._rollout(r) for r in self.requests]

    def _reap(self) -> None:
        if any(r.done for r in self.running):
            self.running = [r for r in self.running if not r.done]

    # -- admission, prefill, pressure --------------------------------------------------------------------
    def _admit(self) -> list[list[Request]]:
        pool, eng = self.pool, self.engine
        admitted: list[list[Request]] = []
        if not self.waiting:
            return admitted
        promised = 0  # blocks the groups admitted in this call will take
        n_running = len(self.running)
        active = sum(len(r.active) for r in self.running)
        prefill_tokens = 0
        while self.waiting:
            group = self.waiting[0]
            n = len(group)
            plen = len(group[0].prompt_ids)
            if admitted and (len(admitted) >= eng.max_batch_rows
                             or prefill_tokens + plen > eng.max_prefill_tokens):
                break  # one prefill forward at a time stays bounded
            prompt_blocks = pool.blocks_for(plen)
            need = prompt_blocks + n * eng.reserve_blocks
            if need > pool.num_blocks:  # the group can never fit at once
                k = (pool.num_blocks - prompt_blocks) // eng.reserve_blocks if eng.reserve_blocks else 0
                if k >= 1:  # admit as many of its samples as fit together; the rest queue right behind them
                    self.waiting[0] = group[:k]
                    self.waiting.insert(1, group[k:])
                    continue
                self.waiting.popleft()  # not even one sample fits (generate refuses such prompts first)
                for r in group:
                    r.end("aborted")
                continue
            busy = n_running > 0
            if busy and n_running + n > eng.max_running_requests:
                break
            if busy and pool.num_free - promised - need < active:
                break
            self.waiting.popleft()
            admitted.append(group)
            promised += need
            prefill_tokens += plen
            n_running += n
            active += n
        return admitted

    def _prefill(self, groups: list[list[Request]]) -> None:
        """Prefill each prompt once (chunked, causal, batched over groups); its n samples share the blocks."""
        prompts = [g[0].prompt_ids for g in groups]
        positions = [g[0].graph.position_ids()[:len(p)] for g, p in zip(groups, prompts)]  # from the layout
        tables = [BlockTable(self.pool) for _ in groups]
        try:
            last = self._prefill_chunks(prompts, positions, tables)
            roots, which = [], []
            for j, group in enumerate(groups):
                for req in group:
                    table = tables[j].fork()
                    req.tables.append(table)
                    root = req.start(auto_fork=self.mode == "sequential")
                    root.table = table
                    req.blocks_held = req.peak_blocks = len(table.blocks)
                    roots.append(root)
                    which.append(j)
                    self.running.append(req)
        finally:  # the prompt tables' own references go back even if something above raised
            for t in tables:
                if not t.released:
                    t.release()
        self._emit(roots, torch.stack([last[j] for j in which]))

    def _prefill_chunks(self, prompts, positions, tables) -> list[torch.Tensor]:
        chunk = self.engine.prefill_chunk
        last: list[torch.Tensor | None] = [None] * len(prompts)
        c = 0
        while True:
            rows = [j for j, p in enumerate(prompts) if len(p) > c]
            if not rows:
                break
            ids = [prompts[j][c:c + chunk] for j in rows]
            for j, q in zip(rows, ids):
                for _ in q:
                    tables[j].append_slot()
            inp = self.runner.prepare_extend(self.pool, [tables[j] for j in rows], ids,
                                             [positions[j][c:c + len(q)] for j, q in zip(rows, ids)])
            logits = self.runner.run(self.pool, inp)
            for r, (j, q) in enumerate(zip(rows, ids)):
                if c + len(q) == len(prompts[j]):
                    last[j] = logits[r]
            c += chunk
        return last

    def _make_room(self) -> list[Branch]:
        """The rows of the next step, after preempting the newest requests until every row has its slots."""
        while True:
            rows = [b for r in self.running for b in r.active]
            need = sum(b.table.blocks_needed(1 + len(b.forced)) for b in rows)
            if need <= self.pool.num_free:
                return rows
            if len(self.running) > 1:
                self._preempt(self.running.pop())
            else:  # alone and still too big for the pool: nothing to wait for
                self.running[-1].end("aborted")
                self._reap()

    def _preempt(self, req: Request) -> None:
        """Give back the request's blocks and queue a fresh copy of it, first, to start over from its prompt."""
        req.end("")
        fresh = self._request(req.index, req.prompt_index, req.sample_index, req.prompt_ids)
        self.requests[req.index] = fresh
        self.preemptions += 1
        self.waiting.appendleft([fresh])

    # -- one step ------------------------------------------------------------------------------------------
    def _reserve(self, b: Branch, n: int) -> None:
        """KV slots for ``n`` new tokens of ``b``, counted against its request's blocks."""
        t, req = b.table, b.traj
        before = len(t.blocks)
        for _ in range(n):
            t.append_slot()
        req.blocks_held += len(t.blocks) - before
        if req.blocks_held > req.peak_blocks:
            req.peak_blocks = req.blocks_held

    def _step(self, rows: list[Branch]) -> None:
        """One forward for the rows that feed one token, one for those that feed a forced run; then emit."""
        runner, pool = self.runner, self.pool
        single = [i for i, b in enumerate(rows) if not b.forced]
        runs = [i for i, b in enumerate(rows) if b.forced]
        for b in rows:
            self._reserve(b, 1 + len(b.forced))
        parts, forced_lps = [], {}
        if single:
            bs = [rows[i] for i in single]
            parts.append(runner.run(pool, runner.prepare_decode(pool, [b.table for b in bs], [b.pending for b in bs],
                                                                [b.pending_pos for b in bs])))
        if runs:
            nxt, per_row = self._forward_runs([rows[i] for i in runs])
            forced_lps = dict(zip(runs, per_row))
            parts.append(nxt)
        if len(parts) == 1:
            nxt = parts[0]
        else:  # back to row order
            order = torch.tensor(single + runs, device=parts[0].device)
            nxt = torch.empty((len(rows), parts[0].shape[1]), dtype=parts[0].dtype, device=parts[0].device)
            nxt[order] = torch.cat(parts)
        self._emit(rows, nxt, forced_lps)

    def _forward_runs(self, bs: list[Branch]) -> tuple[torch.Tensor, list[tuple[list[float], list[int]]]]:
        """One forward of rows ``[pending, *forced]``: the logits after each row's last token, and per row the
        logprobs of its forced tokens with the positions they were fed at."""
        runner, pool = self.runner, self.pool
        toks = [[b.pending, *b.forced] for b in bs]
        # positions after pending's: the cursor's next, then consecutive (a forced run stays in one trace)
        pos = [[b.pending_pos] + [b.cursor.next_position + k for k in range(len(b.forced))] for b in bs]
        logits = runner.run(pool, runner.prepare_extend(pool, [b.table for b in bs], toks, pos, every=True))
        dev = logits.device
        qs = [len(t) for t in toks]
        r_idx = torch.tensor([r for r, q in enumerate(qs) for _ in range(q - 1)], device=dev)
        k_idx = torch.tensor([k for q in qs for k in range(q - 1)], device=dev)
        want = torch.tensor([t for b in bs for t in b.forced], device=dev)
        lps = policy_logprobs(logits[r_idx, k_idx], want, self.params.temperature).tolist()
        per_row, a = [], 0
        for q, p in zip(qs, pos):
            per_row.append((lps[a:a + q - 1], p[1:]))
            a += q - 1
        return logits[torch.arange(len(bs), device=dev), torch.tensor(qs, device=dev) - 1], per_row

    def _emit(self, rows: list[Branch], logits: torch.Tensor, forced_lps: dict | None = None) -> None:
        """Append each row's forced run, choose (or force) its next token with its policy logprob, and apply it."""
        step = self.steps
        for b in rows:
            req = b.traj
            if not req.done and req.last_step != step:
                req.last_step = step
                req.decode_steps += 1
        if forced_lps:  # forced runs first, token k of every run before token k + 1 of any (as one per step did)
            longest = max(len(v[0]) for v in forced_lps.values())
            for k in range(longest):
                for i, (lps, pos) in forced_lps.items():
                    b = rows[i]
                    if k < len(lps) and not b.traj.done:
                        if b.cursor.next_position != pos[k]:
                            raise RuntimeError("a forced run left its trace: its positions were guessed wrong")
                        self._append(b, b.forced.pop(0), lps[k], True)
        B = len(rows)
        sample = [i for i, b in enumerate(rows) if b.state not in (FORKING, FINISHING) and not b.traj.done]
        chosen = [0] * B
        for i, b in enumerate(rows):
            if b.state == FORKING:
                chosen[i] = b.traj.step_open
            elif b.state == FINISHING:
                chosen[i] = b.traj.takeaway_open
        if len(sample) == B:
            chosen_t = self._sample(rows, sample, logits)
        else:
            chosen_t = torch.tensor(chosen, device=logits.device)
            if sample:
                chosen_t[torch.tensor(sample, device=logits.device)] = self._sample(rows, sample, logits)
        lps = policy_logprobs(logits, chosen_t, self.params.temperature).tolist()
        toks = chosen_t.tolist()
        for i, b in enumerate(rows):
            req = b.traj
            if req.done:
                continue
            if b.state == FINISHING:
                b.takeaway_lp = lps[i]
                parent = req.finish_child(b)
                if parent is not None:
                    self._append(parent, parent.forced.pop(0), parent.takeaway_lp, True)
            elif b.state == FORKING:
                for c in req.fork(b):
                    if req.done:
                        break
                    self._append(c, c.forced.pop(0), lps[i], True)
            else:
                self._append(b, toks[i], lps[i], False)

    def _sample(self, rows: list[Branch], idx: list[int], logits: torch.Tensor) -> torch.Tensor:
        P = self.params
        x = logits if len(idx) == len(rows) else logits[torch.tensor(idx, device=logits.device)]
        bs = [rows[i] for i in idx]
        pen = [P.step_repetition_penalty if b.cursor.in_open_step else P.repetition_penalty for b in bs]
        gens = groups = None
        if P.seed is not None and not P.greedy:
            gens, groups, start = [], [], 0
            for j in range(1, len(bs) + 1):
                if j == len(bs) or bs[j].traj is not bs[start].traj:
                    gens.append(bs[start].traj.generator)
                    groups.append((start, j))
                    start = j
        return self.sampler.sample(x, [b.row for b in bs], pen, [b.ctx for b in bs] if P.logits_processors else None,
                                   gens, groups, owned=x is not logits)

    def _append(self, b: Branch, tok: int, lp: float, forced: bool) -> None:
        pos = b.cursor.next_position
        b.pending, b.pending_pos = tok, pos
        if b.ctx is not None:
            b.ctx.append(tok)
        self.sampler.saw(b.row, tok)
        b.traj.append(b, tok, lp, forced)  # may end the request (its rows are freed then)

    # -- what the life cycle means for KV tables, contexts and presence rows --------------------------------
    def new_branch(self, req: Request, cursor, parent: Branch | None) -> Branch:
        b = Branch(req, cursor, parent)
        if parent is None:  # the root: the prefill gives it the prompt's table
            if self.params.logits_processors:
                b.ctx = list(req.prompt_ids)
            b.row = self.sampler.new_row(req.prompt_ids)
        else:  # a child shares its parent's blocks and copies what the parent sees
            b.table = parent.table.fork()
            req.tables.append(b.table)
            if parent.ctx is not None:
                b.ctx = list(parent.ctx)
            b.row = self.sampler.copy_row(parent.row)
        return b

    def joined(self, p: Branch, children: list[Branch]) -> None:
        p.table.join([c.table for c in children])
        if p.ctx is not None:
            base = len(p.ctx)
            for c in children:
                p.ctx.extend(c.ctx[base:])
        self.sampler.merge_rows(p.row, [c.row for c in children])
        for c in children:
            c.row = -1
        p.takeaway_lp = children[-1].takeaway_lp  # the takeaway is predicted from the last step's </step>

    def ended(self, req: Request) -> None:
        req.t_end = time.perf_counter()
        for t in req.tables:
            if not t.released:
                t.release()
        for b in req.branches:
            self.sampler.free_row(b.row)
            b.row = -1

    # -- results -----------------------------------------------------------------------------------------
    def _rollout(self, req: Request) -> Rollout:
        return req.rollout(Rollout, wall_s=(req.t_end or time.perf_counter()) - self.t0,
                           decode_steps=req.decode_steps, peak_kv_blocks=req.peak_blocks,
                           prompt_index=req.prompt_index, sample_index=req.sample_index)
