"""Scheduler: one ``generate`` call. Requests become branches; branches fork, finish and join; every step is
one batched forward over every active branch of every running request (continuous batching).

Branch life cycle (``pending`` is the branch's last appended token, not yet fed through the model):

* ``ACTIVE``: the next forward feeds ``pending``; its logits choose the next token (sampled, or forced from
  the branch's queue) which is appended to the branch's ``npr_env`` cursor. The position of every token is the
  cursor's ``next_position`` read before the append: positions come from the graph's layout rule only.
* ``Event.FORK`` (a guideline closed with 1..max_plans plans): if depth, remaining budget and pool headroom
  allow, the branch becomes ``FORKING``: the next forward caches ``</guideline>`` and its logits give the
  (forced) ``<step>`` of every child; then ``cursor.fork()`` opens one child per plan, each child's block
  table shares the parent's blocks, and ``<step>`` + ``"N:"`` are forced into child N. Otherwise
  ``cursor.decline_fork()``: the steps are decoded one after another in this branch.
* ``Event.STEP_DONE`` on a child's own step: the child becomes ``FINISHING``: the next forward caches its
  ``</step>`` (the takeaway must see it), and its logits give the logprob of the forced ``<takeaway>``.
* When every sibling is done: ``cursor.join()``, the parent's table is extended with the children's blocks
  (no recompute), and ``<takeaway>`` is forced into the parent at ``next_position`` (after the longest step).
* ``Event.EOS``, a stop token, the budget, or (optionally) a format violation ends the whole request.

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

import numpy as np
import torch

from npr_env.graph import Event, ExecutionGraph

from .kv_cache import BlockTable
from .rollout import Rollout
from .sampling import SamplingParams, apply_repetition_penalty, choose, policy_logprobs

ACTIVE, FORKING, FINISHING, WAITING, DONE = range(5)
NEG_INF = float("-inf")


class Branch:
    __slots__ = ("req", "cursor", "table", "parent", "children", "n_done", "pending", "pending_pos", "forced",
                 "state", "path_len", "ctx", "row", "takeaway_lp")

    def __init__(self, req: Request, cursor, table: BlockTable, parent: Branch | None = None, path_len: int = 0):
        self.req, self.cursor, self.table, self.parent = req, cursor, table, parent
        self.children: list[Branch] = []
        self.n_done = 0
        self.pending = -1
        self.pending_pos = -1
        self.forced: list[int] = []
        self.state = ACTIVE
        self.path_len = path_len
        self.ctx: list[int] | None = None  # visible tokens in serialized order (only with logits processors)
        self.row = -1  # row of the repetition-penalty presence matrix (-1: penalties off)
        self.takeaway_lp = 0.0


class Request:
    __slots__ = ("index", "prompt_index", "sample_index", "prompt", "graph", "generator", "active", "branches",
                 "tables", "done", "finish_reason", "total", "num_forks", "decode_steps", "last_step", "n_found",
                 "t_end", "blocks_held", "peak_blocks")

    def __init__(self, index: int, prompt_index: int, sample_index: int, prompt: list[int], graph: ExecutionGraph,
                 generator: torch.Generator | None):
        self.index, self.prompt_index, self.sample_index = index, prompt_index, sample_index
        self.prompt, self.graph, self.generator = prompt, graph, generator
        self.active: list[Branch] = []
        self.branches: list[Branch] = []
        self.tables: list[BlockTable] = []
        self.done = False
        self.finish_reason = ""
        self.total = self.num_forks = self.decode_steps = self.n_found = 0
        self.last_step = -1
        self.t_end = 0.0
        self.blocks_held = self.peak_blocks = 0


class Scheduler:
    """The state of one ``NPREngine.generate`` call; :meth:`run` returns the rollouts in request order."""

    def __init__(self, engine, prompts: list[list[int]], params: SamplingParams, mode: str,
                 stop_on_violation: bool):
        self.engine, self.params, self.mode = engine, params, mode
        self.pool, self.runner = engine.pool, engine.runner
        self.device = self.runner.device
        self.stop_on_violation = stop_on_violation
        self.total_budget = params.total_budget
        self.stop_ids = frozenset(int(t) for t in params.stop_token_ids)
        self.eos_ids = sorted(engine.vocab.eos_ids)
        self.step_open, self.takeaway_open = engine.step_open_id, engine.takeaway_open_id
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
        # repetition penalty: one presence row [V] per branch, on the device
        self.presence: torch.Tensor | None = None
        self._free_rows: list[int] = []
        self._pres_rows: list[int] = []
        self._pres_toks: list[int] = []
        if params.uses_penalty:
            self.presence = torch.zeros(64, self.runner.head_w.shape[0], dtype=torch.bool, device=self.device)
            self._free_rows = list(range(63, -1, -1))

    def _request(self, index: int, prompt_index: int, sample_index: int, prompt: list[int]) -> Request:
        """A fresh request: an empty graph, and a generator seeded from ``params.seed`` and its index."""
        gen = None
        if self.params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(self.params.seed) + index)
        graph = ExecutionGraph(self.engine.tokenizer, prompt, constraints=self.engine.constraints, layout=self.layout)
        return Request(index, prompt_index, sample_index, prompt, graph, gen)

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
                        chunk = [b for b in rows[a:a + cap] if not b.req.done]
                        if chunk:
                            self._emit(chunk, self._forward_decode(chunk))
                    self.steps += 1
                    self._reap()
                    self.step_log.append((len(rows), tick() - t0))
                elif idle and not admitted and self.waiting:
                    raise RuntimeError("scheduler stalled: nothing running and nothing admissible")
        except BaseException:
            for r in self.requests:
                self._finish(r, "aborted")
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
            if admitted and (len(admitted) >= eng.max_batch_rows
                             or prefill_tokens + len(group[0].prompt) > eng.max_prefill_tokens):
                break  # one prefill forward at a time stays bounded
            prompt_blocks = pool.blocks_for(len(group[0].prompt))
            need = prompt_blocks + n * eng.reserve_blocks
            if need > pool.num_blocks:  # the group can never fit at once
                k = (pool.num_blocks - prompt_blocks) // eng.reserve_blocks if eng.reserve_blocks else 0
                if k >= 1:  # admit as many of its samples as fit together; the rest queue right behind them
                    self.waiting[0] = group[:k]
                    self.waiting.insert(1, group[k:])
                    continue
                self.waiting.popleft()  # not even one sample fits (generate refuses such prompts first)
                for r in group:
                    self._finish(r, "aborted")
                continue
            busy = n_running > 0
            if busy and n_running + n > eng.max_running_requests:
                break
            if busy and pool.num_free - promised - need < active:
                break
            self.waiting.popleft()
            admitted.append(group)
            promised += need
            prefill_tokens += len(group[0].prompt)
            n_running += n
            active += n
        return admitted

    def _prefill(self, groups: list[list[Request]]) -> None:
        """Prefill each prompt once (chunked, causal, batched over groups); its n samples share the blocks."""
        pool, dev, chunk = self.pool, self.device, self.engine.prefill_chunk
        prompts = [g[0].prompt for g in groups]
        positions = [g[0].graph.position_ids()[:len(g[0].prompt)] for g in groups]  # from the layout
        tables = [BlockTable(pool) for _ in groups]
        try:
            last = self._prefill_chunks(prompts, positions, tables, chunk)
            roots, which = [], []
            for j, group in enumerate(groups):
                for req in group:
                    table = tables[j].fork()
                    req.tables.append(table)
                    root = Branch(req, req.graph.cursor(auto_fork=self.mode == "sequential"), table)
                    req.branches.append(root)
                    req.active = [root]
                    req.blocks_held = req.peak_blocks = len(table.blocks)
                    if self.params.logits_processors:
                        root.ctx = list(req.prompt)
                    if self.presence is not None:
                        root.row = self._alloc_row()
                        self.presence[root.row] = False
                        self.presence[root.row, torch.tensor(req.prompt, device=dev)] = True
                    roots.append(root)
                    which.append(j)
                    self.running.append(req)
        finally:  # the prompt tables' own references go back even if something above raised
            for t in tables:
                if not t.released:
                    t.release()
        self._emit(roots, torch.stack([last[j] for j in which]))

    def _prefill_chunks(self, prompts, positions, tables, chunk) -> list[torch.Tensor]:
        pool, dev = self.pool, self.device
        last: list[torch.Tensor | None] = [None] * len(prompts)
        c = 0
        while True:
            rows = [j for j, p in enumerate(prompts) if len(p) > c]
            if not rows:
                break
            qlens = [min(chunk, len(prompts[j]) - c) for j in rows]
            R, Q = len(rows), max(qlens)
            Lk = c + Q
            ids = np.zeros((R, Q), dtype=np.int64)
            pos = np.zeros((R, Q), dtype=np.int64)
            slots = np.full((R, Q), pool.scratch_slot, dtype=np.int64)
            keys = np.full((R, Lk), pool.scratch_slot, dtype=np.int64)
            for r, (j, q) in enumerate(zip(rows, qlens)):
                ids[r, :q] = prompts[j][c:c + q]
                pos[r, :q] = positions[j][c:c + q]
                t = tables[j]
                for s in range(q):
                    slots[r, s] = t.append_slot()
                keys[r, :c + q] = t.slots[:c + q]
            kpos = torch.arange(Lk, device=dev)
            qabs = c + torch.arange(Q, device=dev)
            klen = torch.tensor([c + q for q in qlens], device=dev)
            allowed = (kpos[None, None, :] <= qabs[None, :, None]) & (kpos[None, None, :] < klen[:, None, None])
            bias = torch.zeros((R, 1, Q, Lk), dtype=self.runner.dtype, device=dev)
            bias.masked_fill_(~allowed[:, None], NEG_INF)
            logits = self.runner.forward(
                pool, torch.from_numpy(ids).to(dev), torch.from_numpy(pos).to(dev),
                torch.from_numpy(slots.reshape(-1)).to(dev), torch.from_numpy(keys).to(dev), bias,
                torch.tensor([q - 1 for q in qlens], device=dev))
            for r, (j, q) in enumerate(zip(rows, qlens)):
                if c + q == len(prompts[j]):
                    last[j] = logits[r]
            c += chunk
        return last

    def _make_room(self) -> list[Branch]:
        """The rows of the next step, after preempting the newest requests until every row has a slot."""
        while True:
            rows = [b for r in self.running for b in r.active]
            need = sum(1 for b in rows if b.table.needs_block())
            if need <= self.pool.num_free:
                return rows
            if len(self.running) > 1:
                self._preempt(self.running.pop())
            else:  # alone and still too big for the pool: nothing to wait for
                self._finish(self.running[-1], "aborted")
                self._reap()

    def _preempt(self, req: Request) -> None:
        """Give back the request's blocks and queue a fresh copy of it, first, to start over from its prompt."""
        self._finish(req, "")
        fresh = self._request(req.index, req.prompt_index, req.sample_index, req.prompt)
        self.requests[req.index] = fresh
        self.preemptions += 1
        self.waiting.appendleft([fresh])

    # -- one step ------------------------------------------------------------------------------------------
    def _forward_decode(self, rows: list[Branch]) -> torch.Tensor:
        pool, dev = self.pool, self.device
        B = len(rows)
        toks, pos, slots, lens = [], [], [], []
        for b in rows:
            t = b.table
            if t.needs_block():
                req = b.req
                req.blocks_held += 1
                if req.blocks_held > req.peak_blocks:
                    req.peak_blocks = req.blocks_held
            slots.append(t.append_slot())
            toks.append(b.pending)
            pos.append(b.pending_pos)
            lens.append(t.n)
        L = max(lens)
        if B == 1:
            keys = torch.from_numpy(rows[0].table.slots[:L]).view(1, L)
        else:
            idx = np.full((B, L), pool.scratch_slot, dtype=np.int64)
            for i, b in enumerate(rows):
                idx[i, :lens[i]] = b.table.slots[:lens[i]]
            keys = torch.from_numpy(idx)
        bias = None
        if min(lens) != L:
            pad = torch.arange(L, device=dev)[None, :] >= torch.tensor(lens, device=dev)[:, None]
            bias = torch.zeros((B, 1, 1, L), dtype=self.runner.dtype, device=dev)
            bias.masked_fill_(pad.view(B, 1, 1, L), NEG_INF)
        return self.runner.forward(
            pool, torch.tensor(toks, device=dev).view(B, 1), torch.tensor(pos, device=dev).view(B, 1),
            torch.tensor(slots, device=dev), keys.to(dev), bias)

    def _emit(self, rows: list[Branch], logits: torch.Tensor) -> None:
        """Choose (or force) each row's next token, record its policy logprob, and apply it to the branch."""
        B = len(rows)
        chosen = [0] * B
        sample = []
        for i, b in enumerate(rows):
            st = b.state
            if st == FORKING:
                chosen[i] = self.step_open
            elif st == FINISHING:
                chosen[i] = self.takeaway_open
            elif b.forced:
                chosen[i] = b.forced[0]
            else:
                sample.append(i)
        if len(sample) == B:
            chosen_t = self._sample(rows, sample, logits)
        else:
            chosen_t = torch.tensor(chosen, device=logits.device)
            if sample:
                chosen_t[torch.tensor(sample, device=logits.device)] = self._sample(rows, sample, logits)
        lps = policy_logprobs(logits, chosen_t, self.params.temperature).tolist()
        toks = chosen_t.tolist()
        step = self.steps
        for i, b in enumerate(rows):
            req = b.req
            if req.done:
                continue
            if req.last_step != step:
                req.last_step = step
                req.decode_steps += 1
            st = b.state
            if st == FINISHING:
                self._finish_child(b, lps[i])
            elif st == FORKING:
                self._fork(b, lps[i])
            elif b.forced:
                b.forced.pop(0)
                self._append(b, toks[i], lps[i], True)
            else:
                self._append(b, toks[i], lps[i], False)
        self._flush_presence()

    def _sample(self, rows: list[Branch], idx: list[int], logits: torch.Tensor) -> torch.Tensor:
        P = self.params
        x = logits if len(idx) == len(rows) else logits[torch.tensor(idx, device=logits.device)]
        procs = P.logits_processors
        modify = P.ignore_eos or self.presence is not None or procs
        if modify and x is logits:
            x = x.clone()  # the raw logits still give the logprobs
        if P.ignore_eos and self.eos_ids:
            x[:, self.eos_ids] = NEG_INF
        if self.presence is not None:
            self._flush_presence()
            pen = []
            for i in idx:
                in_step = rows[i].cursor.in_open_step
                pen.append(P.step_repetition_penalty if in_step else P.repetition_penalty)
            if any(p != 1.0 for p in pen):
                seen = self.presence[torch.tensor([rows[i].row for i in idx], device=x.device)]
                x = apply_repetition_penalty(x, seen, torch.tensor(pen, device=x.device))
        if procs:
            out = []
            for j, i in enumerate(idx):
                row = x[j]
                ctx = rows[i].ctx
                for p in procs:
                    row = p(ctx, row)
                out.append(row)
            x = torch.stack(out)
        gens = groups = None
        if P.seed is not None and not P.greedy:
            gens, groups, start = [], [], 0
            for j in range(1, len(idx) + 1):
                if j == len(idx) or rows[idx[j]].req is not rows[idx[start]].req:
                    gens.append(rows[idx[start]].req.generator)
                    groups.append((start, j))
                    start = j
        return choose(x, P, gens, groups)

    # -- branch transitions ----------------------------------------------------------------------------
    def _append(self, b: Branch, tok: int, lp: float, forced: bool) -> None:
        req = b.req
        cur = b.cursor
        pos = cur.next_position
        ev = cur.append(tok, (lp, forced))
        b.pending, b.pending_pos = tok, pos
        b.path_len += 1
        req.total += 1
        if b.ctx is not None:
            b.ctx.append(tok)
        if b.row >= 0:
            self._pres_rows.append(b.row)
            self._pres_toks.append(tok)
        if ev is Event.EOS:
            return self._finish(req, "eos")
        if tok in self.stop_ids:
            return self._finish(req, "stop")
        if self.stop_on_violation:
            found = req.graph.num_flags  # cheap: the expensive check only runs when the parser flagged something
            if found != req.n_found:
                req.n_found = found
                if req.graph.violations_so_far():
                    return self._finish(req, "violation")
        if b.path_len >= self.params.max_new_tokens or req.total >= self.total_budget:
            return self._finish(req, "length")
        if ev is Event.FORK:
            if self._may_fork(b):
                b.state = FORKING
            else:
                cur.decline_fork()
        elif ev is Event.STEP_DONE and b.parent is not None and cur.trace is cur.home:
            b.state = FINISHING

    def _may_fork(self, b: Branch) -> bool:
        eng, req = self.engine, b.req
        if self.mode != "parallel" or b.cursor.depth >= eng.max_depth:
            return False
        remaining = min(self.params.max_new_tokens - b.path_len, self.total_budget - req.total)
        # The pool is never consulted: a fork under KV pressure is absorbed by preemption, so the pool size
        # changes speed, never the sample (a declined fork would decode the steps sequentially instead).
        return remaining >= eng.min_fork_budget

    def _fork(self, b: Branch, lp: float) -> None:
        self._flush_presence()
        req, cur = b.req, b.cursor
        numbers = cur.step_numbers()
        cursors = cur.fork()
        b.state = WAITING
        children = []
        for num, cc in zip(numbers, cursors):
            c = Branch(req, cc, b.table.fork(), parent=b, path_len=b.path_len)
            req.tables.append(c.table)
            req.branches.append(c)
            if b.ctx is not None:
                c.ctx = list(b.ctx)
            if self.presence is not None:
                c.row = self._alloc_row()
                self.presence[c.row] = self.presence[b.row]
            c.forced = list(self.engine.vocab.step_number_ids(num))
            children.append(c)
        b.children, b.n_done = children, 0
        i = req.active.index(b)
        req.active[i:i + 1] = children
        req.num_forks += 1
        for c in children:
            if req.done:
                break
            self._append(c, self.step_open, lp, True)

    def _finish_child(self, b: Branch, lp: float) -> None:
        b.takeaway_lp = lp
        b.state = DONE
        b.req.active.remove(b)
        p = b.parent
        p.n_done += 1
        if p.n_done == len(p.children):
            self._join(p)

    def _join(self, p: Branch) -> None:
        self._flush_presence()
        req, children = p.req, p.children
        p.cursor.join()
        p.table.join([c.table for c in children])
        if p.ctx is not None:
            base = len(p.ctx)
            for c in children:
                p.ctx.extend(c.ctx[base:])
        if self.presence is not None:
            rows = torch.tensor([c.row for c in children], device=self.device)
            self.presence[p.row] |= self.presence[rows].any(0)
            for c in children:
                self._free_rows.append(c.row)
                c.row = -1
        p.path_len = max(c.path_len for c in children)
        p.children = []
        p.state = ACTIVE
        req.active.append(p)
        self._append(p, self.takeaway_open, children[-1].takeaway_lp, True)

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.done = True
        req.finish_reason = reason
        req.t_end = time.perf_counter()
        for t in req.tables:
            if not t.released:
                t.release()
        for b in req.branches:
            if b.row >= 0:
                self._free_rows.append(b.row)
                b.row = -1
        req.active = []

    # -- presence rows (repetition penalty) --------------------------------------------------------------
    def _alloc_row(self) -> int:
        self._flush_presence()
        if not self._free_rows:
            n = self.presence.shape[0]
            self.presence = torch.cat([self.presence, torch.zeros_like(self.presence)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        return self._free_rows.pop()

    def _flush_presence(self) -> None:
        if self._pres_rows:
            dev = self.device
            self.presence[torch.tensor(self._pres_rows, device=dev), torch.tensor(self._pres_toks, device=dev)] = True
            self._pres_rows, self._pres_toks = [], []

    # -- results -----------------------------------------------------------------------------------------
    def _rollout(self, req: Request) -> Rollout:
        g = req.graph
        meta = g.token_meta()[g.prompt_len:]
        reason = req.finish_reason or "aborted"
        return Rollout(
            prompt_ids=list(req.prompt), token_ids=g.response_ids,
            logprobs=[float(m[0]) for m in meta], forced_mask=[bool(m[1]) for m in meta],
            graph=g, layout=g.layout_kind, finish_reason=reason, truncated=reason not in ("eos", "stop"),
            wall_s=(req.t_end or time.perf_counter()) - self.t0, decode_steps=req.decode_steps,
            num_tokens=len(meta), num_forks=req.num_forks, peak_kv_blocks=req.peak_blocks,
            prompt_index=req.prompt_index, sample_index=req.sample_index)
