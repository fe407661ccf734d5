"""Dynamic PD disaggregation (xLLM §3.2): SLO-checked P/D placement with live role switching.

Every instance can serve either phase at any time (vLLM's ``NixlConnector`` with
``kv_role=kv_both``), so a role is a routing label the policy moves without a
restart. Each instance has a *home* role (its label when first seen) and,
while the policy has moved it, sits in an elastic pool: **D->P** (home decode,
now prefilling) or **P->D** (home prefill, now decoding). Per instance the
policy keeps a TTFT and a TPOT predictor (``router.policies.predictors``),
profiled when the instance registers and refined from every finished request.

Notation for instance ``i``: ``Q_i`` queued prefill tokens, ``B_i = max(running,
in-flight)``, ``T_i`` running context tokens, ``rho_i`` prefill utilisation
(prefill tokens routed to it per second x its per-token prefill cost),
``K_i`` KV demand (engine-reported usage x learned capacity, plus the tokens of
decodes routed to it that are predicted to arrive within one typical decode
lifetime, ``EWMA(O) x EWMA(TPOT)``: later ones find today's residents gone); for the
request, ``L`` its uncached prompt and ``O`` its ``max_tokens``.

* ``ttft_i = TTFT_i(L, Q_i)``
* ``tpot_i = TPOT_i(B_i + 1, T_i + L + O/2) / (1 - rho_i)``, ``rho_i = 0`` on a pure decoder

**Prefill**, ``budget = ttft_headroom x SLO_ttft``:

1. ``P = argmin ttft_i`` over the P pool (prefill-capable, not draining); take it
   if ``ttft_P <= budget`` (reason ``dpd``);
2. else the best D->P instance still draining its decodes (switched less than
   ``settle_s`` ago) if it meets the budget (``dpd_d2p``);
3. else convert a decode instance: the one with the smallest ``(B_i, T_i)``
   whose switch is ``role_dwell_s`` old, whose own ``ttft`` meets the budget and
   that the decode pool can spare, to ``prefill``; the last decode-capable
   instance may instead become ``both`` while it decodes at most
   ``mixed_max_batch`` sequences (``dpd_convert``, switch reason ``ttft_slo``);
4. else ``argmin ttft_i`` over every prefill-capable instance (``dpd_ttft_at_risk``).

**Decode**, ``budget = tpot_headroom x SLO_tpot``:

1. on ``P`` itself (no KV transfer) when ``P`` may decode (role ``both``, or
   ``local_decode``), its queue is empty and its local TPOT (``tpot_P`` plus, with
   the chance that another prefill lands during the decode, one P90 prefill spread
   over ``O``) is within ``local_decode_headroom x SLO_tpot`` (suffix ``_local``);
2. else ``argmin (T_i, B_i)`` over decode-capable instances with ``tpot_i <= budget``
   and ``K_i + L + O <= max_kv_usage x capacity_i``;
3. else convert the prefill instance with the shortest queue that the prefill pool
   can spare to ``decode`` (switch reason ``tpot_slo``, or ``kv_full`` when only the
   KV test failed);
4. else ``argmin tpot_i`` (suffix ``_decode_at_risk``).

**Spare tests** (``share`` = the headroom for request-triggered switches,
``restore_margin`` for returns home): a pool under pressure within the last
``role_dwell_s`` spares nothing. The decode pool spares ``x`` when the rest,
taking ``x``'s batch and tokens, keeps every predicted TPOT within
``share x SLO_tpot`` and the pool's KV demand within ``share x max_kv_usage`` of
the rest's capacity. The prefill pool spares ``x`` when the rest, taking ``x``'s
queue, keeps a typical (EWMA) prompt's predicted TTFT within ``share x SLO_ttft``
and its mean ``rho`` within ``max_prefill_utilisation``.

**Rebalance** (driver timer): at most one instance per ``role_dwell_s``
returns home (switch reason ``restore``), once its own dwell time has passed,
no request of the kind that moved it was at risk for ``restore_quiet_s``, and
the pool it leaves can spare it with ``restore_margin``. The dwell time, the
quiet period and the stricter margin are the hysteresis. Every switch leaves at
least one prefill-capable and one decode-capable healthy instance.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from router.policies.predictors import (
    Ewma,
    PredictorSettings,
    RateMeter,
    RecentQuantile,
    TPOTPredictor,
    TTFTPredictor,
)
from router.policies.types import (
    ClusterView,
    InstanceState,
    NoInstanceAvailable,
    ProfileSample,
    RequestInfo,
    RequestOutcome,
    Role,
    RoleChange,
    RoutingDecision,
)

PREFILL_ROLES: frozenset[str] = frozenset({"prefill", "both"})
DECODE_ROLES: frozenset[str] = frozenset({"decode", "both"})


@dataclass(frozen=True)
class DynamicPDSettings:
    """Every threshold of the rule (module docstring) in one place."""

    default_slo_ttft_ms: float | None = None
    """TTFT SLO of requests that carry none (the router fills its --slo-ttft-ms in first)."""
    default_slo_tpot_ms: float | None = None
    """TPOT SLO of requests that carry none."""
    ttft_headroom: float = 0.8
    """A prefill instance qualifies when its predicted TTFT is within this share of the SLO."""
    tpot_headroom: float = 0.8
    """A decode instance qualifies when its predicted TPOT is within this share of the SLO."""
    local_decode: bool = False
    """Let a pure prefill instance keep a request's decode when its local TPOT allows.
    Off by default: in the simulator it lost TPOT attainment on every trace tried
    (prefills routed there later interfere); ``both`` instances decode locally regardless."""
    local_decode_headroom: float = 0.5
    """Share of the TPOT SLO a local decode on a prefill instance may use."""
    max_kv_usage: float = 0.9
    """A decode instance takes no decode that would lift its KV demand above this share."""
    role_dwell_s: float = 10.0
    """An instance keeps a role the policy gave it at least this long; at most one
    instance returns home per this period; a pool that was under pressure this
    recently gives up no instance."""
    settle_s: float = 5.0
    """A decode instance switched to prefill is in the D->P pool (used only after the P
    pool) this long, while its running decodes finish; then it is a P-pool member."""
    restore_quiet_s: float = 30.0
    """An instance returns home only after this long without pressure of the kind that moved it."""
    restore_margin: float = 0.5
    """Share of the SLO (and of ``max_kv_usage``) the rest must stay within for a return home."""
    max_prefill_utilisation: float = 0.8
    """A prefill pool whose remaining members would exceed this mean ``rho`` spares none."""
    mixed_max_batch: int = 4
    """The last decode-capable instance may take prefill too (role ``both``) only while it
    decodes at most this many sequences."""
    rate_window_s: float = 10.0
    """Window of the per-instance prefill token and request rates."""
    pending_limit: int = 100_000
    """Requests remembered between route() and observe() (oldest forgotten first)."""
    predictors: PredictorSettings = field(default_factory=PredictorSettings)


@dataclass
class _Member:
    """What the policy keeps per instance."""

    home: Role
    ttft: TTFTPredictor
    tpot: TPOTPredictor
    prefill_rate: RateMeter
    arrivals: RateMeter
    switched_at: float = -math.inf
    profiled: bool = False
    kv_capacity: Ewma = field(default_factory=lambda: Ewma(0.1))
    """KV tokens the instance holds when full, learned as running_tokens / kv_usage."""
    incoming: list[tuple[float, float]] = field(default_factory=list)
    """(predicted arrival time, prompt + max_tokens) of decodes routed here whose KV is
    not resident yet: they count until their predicted prefill end plus the handoff."""


@dataclass(frozen=True, slots=True)
class _Pending:
    """Features a request was routed with, to pair with its measured outcome."""

    prefill_id: str
    decode_id: str
    prompt: float
    queued: float
    mean_prompt: float
    batch: float
    tokens: float
    pure_decode: bool


class DynamicPDPolicy:
    """The rule in the module docstring; one object serves one model's instances."""

    name = "dynamic_pd"
    splits_prefill = True  # prefill on P, decode on D (the live EPD profiler names paths by it)
    default_prefill_fraction = 0.5
    """The simulator's initial split when the deployment names no roles."""

    def __init__(self, settings: DynamicPDSettings | None = None, **overrides: object) -> None:
        base = settings or DynamicPDSettings()
        self.settings = replace(base, **overrides) if overrides else base  # type: ignore[arg-type]
        self._members: dict[str, _Member] = {}
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._prompt = Ewma(0.05)
        self._prompt_tail = RecentQuantile(0.9)
        self._handoff = Ewma(0.05)
        self._output = Ewma(0.05)
        self._tpot_seen = Ewma(0.05)
        self._slo_ttft = Ewma(0.05, self.settings.default_slo_ttft_ms)
        self._slo_tpot = Ewma(0.05, self.settings.default_slo_tpot_ms)
        self._pressure_at = {"ttft": -math.inf, "tpot": -math.inf}
        self._restored_at = -math.inf
        self.switches: list[tuple[float, str, str, str, str]] = []
        """(time, instance, from, to, reason) of every switch this policy asked for."""

    # -- profiling (ProfilingPolicy) ---------------------------------------------------------

    def profile_plan(self) -> tuple[tuple[int, int], ...]:
        """Four isolated prompts (the quadratic TTFT term needs three lengths), 8 tokens each."""
        return ((64, 8), (512, 8), (1024, 8), (2048, 8))

    def observe_profile(self, instance_id: str, samples: tuple[ProfileSample, ...]) -> None:
        member = self._member(instance_id, "both")
        member.ttft.fit_profile([(s.prompt_tokens, s.ttft_ms) for s in samples])
        member.tpot.fit_profile([(1, s.prompt_tokens + s.output_tokens / 2, s.tpot_ms)
                                 for s in samples if s.tpot_ms is not None])
        member.profiled = True

    # -- what an operator (or a test) may read ------------------------------------------------

    def home_role(self, instance_id: str) -> Role | None:
        member = self._members.get(instance_id)
        return member.home if member else None

    def predicted_ttft_ms(self, instance_id: str, prompt_tokens: float,
                          queued_tokens: float = 0.0) -> float:
        return self._members[instance_id].ttft.predict_ms(prompt_tokens, queued_tokens,
                                                          self._prompt.value)

    @property
    def handoff_ms(self) -> float | None:
        """Measured P->D handoff (transfer + the decode instance's first step), EWMA."""
        return self._handoff.value

    # -- state ------------------------------------------------------------------------------

    def _member(self, instance_id: str, role: Role) -> _Member:
        member = self._members.get(instance_id)
        if member is None:
            p, window = self.settings.predictors, self.settings.rate_window_s
            member = self._members[instance_id] = _Member(
                home=role, ttft=TTFTPredictor(p), tpot=TPOTPredictor(p),
                prefill_rate=RateMeter(window), arrivals=RateMeter(window))
        return member

    def _sync(self, view: ClusterView) -> None:
        for inst in view.instances:
            member = self._member(inst.instance_id, inst.role)
            if member.switched_at == -math.inf:
                member.home = inst.role  # the deployment's label until the policy moves it
            if inst.kv_usage >= 0.05 and inst.running_tokens > 0:
                member.kv_capacity.add(inst.running_tokens / inst.kv_usage)

    # -- predictions --------------------------------------------------------------------------

    @staticmethod
    def _batch(inst: InstanceState) -> int:
        return max(inst.running, inst.inflight)

    @staticmethod
    def _uncached(request: RequestInfo, view: ClusterView, inst: InstanceState) -> float:
        hits = view.prefix_hits.get(inst.instance_id, 0)
        if not hits or not request.block_hashes:
            return float(request.prompt_tokens)
        block = request.prompt_tokens // max(1, len(request.block_hashes))
        return float(max(1, request.prompt_tokens - hits * block))

    def _rho(self, inst: InstanceState, now: float) -> float:
        member = self._members[inst.instance_id]
        per_token = member.ttft.per_token_ms(self._prompt.value or 0.0)
        return min(0.95, member.prefill_rate.rate(now) * per_token / 1000.0)

    def _ttft(self, inst: InstanceState, prompt: float) -> float:
        return self._members[inst.instance_id].ttft.predict_ms(
            prompt, inst.queued_prefill_tokens, self._prompt.value)

    def _tpot(self, inst: InstanceState, role: str, now: float, prompt: float,
              output: float) -> float:
        member = self._members[inst.instance_id]
        base = member.tpot.predict_ms(self._batch(inst) + 1,
                                      inst.running_tokens + prompt + output / 2)
        rho = self._rho(inst, now) if role in PREFILL_ROLES else 0.0
        return base / (1.0 - rho)

    def _local_tpot(self, inst: InstanceState, role: str, now: float, prompt: float,
                    output: float) -> float:
        """TPOT of a decode kept on prefill instance ``inst``: the mean interference
        ``1/(1 - rho)`` plus, with the chance that another prefill arrives while it
        decodes, one long (P90) prefill spread over its output tokens."""
        mean = self._tpot(inst, role, now, prompt, output)
        member = self._members[inst.instance_id]
        p_hit = 1.0 - math.exp(-member.arrivals.rate(now) * output * mean / 1000.0)
        tail_prompt = self._prompt_tail.value or prompt
        return mean + p_hit * member.ttft.predict_ms(tail_prompt) / max(1.0, output - 1.0)

    def _kv_demand(self, inst: InstanceState, now: float) -> float:
        """Tokens the instance's KV holds now plus decodes routed to it but not resident yet."""
        member = self._members[inst.instance_id]
        if member.incoming and min(t for t, _ in member.incoming) < now:
            member.incoming = [(t, n) for t, n in member.incoming if t >= now]
        capacity = member.kv_capacity.value or 0.0
        horizon = now + (self._output.value or 1.0) * (self._tpot_seen.value or 50.0) / 1000.0
        return max(inst.kv_usage * capacity, inst.running_tokens) + sum(
            n for t, n in member.incoming if t <= horizon)

    def _kv_fits(self, inst: InstanceState, now: float, tokens: float) -> bool:
        limit = self.settings.max_kv_usage
        if inst.kv_usage >= limit:
            return False
        capacity = self._members[inst.instance_id].kv_capacity.value
        return capacity is None or self._kv_demand(inst, now) + tokens <= limit * capacity

    # -- routing ----------------------------------------------------------------------------

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        self._sync(view)
        s, now = self.settings, view.now
        slo_ttft = request.slo_ttft_ms or s.default_slo_ttft_ms
        slo_tpot = request.slo_tpot_ms or s.default_slo_tpot_ms
        if slo_ttft:
            self._slo_ttft.add(slo_ttft)
        if slo_tpot:
            self._slo_tpot.add(slo_tpot)
        self._prompt.add(request.prompt_tokens)
        self._prompt_tail.add(request.prompt_tokens)
        self._output.add(request.max_tokens)
        healthy = view.healthy()
        if not healthy:
            raise NoInstanceAvailable("no healthy instance")
        roles: dict[str, str] = {i.instance_id: i.role for i in healthy}
        changes: list[RoleChange] = []
        ttft_budget = s.ttft_headroom * slo_ttft if slo_ttft else math.inf
        tpot_budget = s.tpot_headroom * slo_tpot if slo_tpot else math.inf

        prefill, reason = self._pick_prefill(request, view, healthy, roles, ttft_budget, changes)
        decode, suffix = self._pick_decode(request, view, healthy, roles, prefill, slo_tpot,
                                           tpot_budget, changes)
        if decode is None:
            raise NoInstanceAvailable("no healthy instance can decode")
        runner = prefill or decode
        prompt = self._uncached(request, view, runner)
        member = self._members[runner.instance_id]
        member.prefill_rate.add(now, prompt)
        member.arrivals.add(now, 1.0)
        resident_at = now + (self._ttft(runner, prompt) + (self._handoff.value or 0.0)) / 1000.0
        self._members[decode.instance_id].incoming.append(
            (resident_at, request.prompt_tokens + request.max_tokens))
        handoff = runner.instance_id != decode.instance_id
        self._remember(request.request_id, _Pending(
            prefill_id=runner.instance_id, decode_id=decode.instance_id, prompt=prompt,
            queued=runner.queued_prefill_tokens, mean_prompt=self._prompt.value or prompt,
            batch=self._batch(decode) + 1,
            tokens=decode.running_tokens + prompt + request.max_tokens / 2,
            pure_decode=handoff and roles[decode.instance_id] == "decode"))
        return RoutingDecision(decode.instance_id,
                               prefill_instance_id=runner.instance_id if handoff else None,
                               reason=reason + suffix, role_changes=tuple(changes))

    def _pick_prefill(self, request: RequestInfo, view: ClusterView,
                      healthy: Sequence[InstanceState], roles: dict[str, str],
                      budget: float, changes: list[RoleChange],
                      ) -> tuple[InstanceState | None, str]:
        def ttft(i: InstanceState) -> float:
            return self._ttft(i, self._uncached(request, view, i))

        capable = [i for i in healthy if roles[i.instance_id] in PREFILL_ROLES]
        draining = [i for i in capable if self._draining(i, view.now)]
        pool = [i for i in capable if not self._draining(i, view.now)]
        for group, reason in ((pool, "dpd"), (draining, "dpd_d2p")):
            best = min(group, key=lambda i: (ttft(i), i.instance_id)) if group else None
            if best is not None and ttft(best) <= budget:
                return best, reason
        if math.isfinite(budget):
            self._pressure_at["ttft"] = view.now
            converted = self._convert_to_prefill(request, view, healthy, roles, budget)
            if converted is not None:
                inst, role = converted
                changes.append(self._switch(view.now, inst, roles, role, "ttft_slo"))
                return inst, "dpd_convert"
        if not capable:
            return None, "dpd_no_prefill"
        return min(capable, key=lambda i: (ttft(i), i.instance_id)), "dpd_ttft_at_risk"

    def _pick_decode(self, request: RequestInfo, view: ClusterView,
                     healthy: Sequence[InstanceState], roles: dict[str, str],
                     prefill: InstanceState | None, slo_tpot: float | None, budget: float,
                     changes: list[RoleChange]) -> tuple[InstanceState | None, str]:
        s, now = self.settings, view.now
        out = float(request.max_tokens)
        need = request.prompt_tokens + request.max_tokens

        def tpot(i: InstanceState) -> float:
            return self._tpot(i, roles[i.instance_id], now, self._uncached(request, view, i), out)

        def same(i: InstanceState) -> str:
            return "_local" if prefill is not None and i.instance_id == prefill.instance_id else ""

        if prefill is not None:
            role = roles[prefill.instance_id]
            local_budget = s.local_decode_headroom * slo_tpot if slo_tpot else math.inf
            if ((role == "both" or s.local_decode) and prefill.queued_prefill_tokens == 0
                    and self._kv_fits(prefill, now, need)
                    and self._local_tpot(prefill, role, now,
                                         self._uncached(request, view, prefill), out)
                    <= local_budget):
                return prefill, "_local"
        capable = [i for i in healthy if roles[i.instance_id] in DECODE_ROLES]
        fits = [i for i in capable if self._kv_fits(i, now, need)]
        ok = [i for i in fits if tpot(i) <= budget]
        if ok:
            best = min(ok, key=lambda i: (i.running_tokens, self._batch(i), i.instance_id))
            return best, same(best)
        if capable and (math.isfinite(budget) or len(fits) < len(capable)):
            self._pressure_at["tpot"] = now
            converted = self._convert_to_decode(request, view, healthy, roles, prefill, budget)
            if converted is not None:
                inst, role = converted
                why = "kv_full" if any(tpot(i) <= budget for i in capable) else "tpot_slo"
                changes.append(self._switch(now, inst, roles, role, why))
                return inst, ""
        if not capable:
            return prefill, "_local"
        best = min(capable, key=lambda i: (tpot(i), i.running_tokens, i.instance_id))
        return best, same(best) + "_decode_at_risk"

    # -- role switches ------------------------------------------------------------------------

    def _draining(self, inst: InstanceState, now: float) -> bool:
        member = self._members[inst.instance_id]
        return member.home == "decode" and now - member.switched_at < self.settings.settle_s

    def _dwelt(self, inst: InstanceState, now: float) -> bool:
        return now - self._members[inst.instance_id].switched_at >= self.settings.role_dwell_s

    def _switch(self, now: float, inst: InstanceState, roles: dict[str, str], role: str,
                reason: str) -> RoleChange:
        self.switches.append((now, inst.instance_id, roles[inst.instance_id], role, reason))
        roles[inst.instance_id] = role
        self._members[inst.instance_id].switched_at = now
        return RoleChange(inst.instance_id, role, reason)  # type: ignore[arg-type]

    def _decode_can_spare(self, view: ClusterView, healthy: Sequence[InstanceState],
                          roles: dict[str, str], x: InstanceState, share: float) -> bool:
        """The decode-capable rest can take ``x``'s decodes (see "Spare tests")."""
        rest = [i for i in healthy if roles[i.instance_id] in DECODE_ROLES and i is not x]
        now = view.now
        if not rest or now - self._pressure_at["tpot"] < self.settings.role_dwell_s:
            return False
        capacity = [self._members[i.instance_id].kv_capacity.value for i in rest]
        if all(c is not None for c in capacity):
            demand = sum(self._kv_demand(i, now) for i in (x, *rest))
            limit = share * self.settings.max_kv_usage * sum(capacity)  # type: ignore[arg-type]
            if demand > limit:
                return False
        slo = self._slo_tpot.value
        if not slo:
            return True
        batch = (self._batch(x) + sum(self._batch(i) for i in rest)) / len(rest)
        tokens = (x.running_tokens + sum(i.running_tokens for i in rest)) / len(rest)
        for i in rest:
            rho = self._rho(i, now) if roles[i.instance_id] in PREFILL_ROLES else 0.0
            tpot = self._members[i.instance_id].tpot.predict_ms(batch + 1, tokens) / (1.0 - rho)
            if tpot > share * slo:
                return False
        return True

    def _prefill_can_spare(self, view: ClusterView, healthy: Sequence[InstanceState],
                           roles: dict[str, str], x: InstanceState, share: float) -> bool:
        """The prefill-capable rest can take ``x``'s prefills (see "Spare tests")."""
        rest = [i for i in healthy if roles[i.instance_id] in PREFILL_ROLES and i is not x]
        now = view.now
        if not rest or now - self._pressure_at["ttft"] < self.settings.role_dwell_s:
            return False
        rho = (self._rho(x, now) + sum(self._rho(i, now) for i in rest)) / len(rest)
        if rho > self.settings.max_prefill_utilisation:
            return False
        slo = self._slo_ttft.value
        if not slo:
            return True
        queue = (x.queued_prefill_tokens + sum(i.queued_prefill_tokens for i in rest)) / len(rest)
        prompt = self._prompt.value or 0.0
        return all(self._members[i.instance_id].ttft.predict_ms(prompt, queue, prompt)
                   <= share * slo for i in rest)

    def _convert_to_prefill(self, request: RequestInfo, view: ClusterView,
                            healthy: Sequence[InstanceState], roles: dict[str, str],
                            budget: float) -> tuple[InstanceState, str] | None:
        s, now = self.settings, view.now
        decoders = [i for i in healthy if roles[i.instance_id] in DECODE_ROLES]
        candidates = sorted((i for i in decoders if roles[i.instance_id] == "decode"
                             and self._dwelt(i, now)),
                            key=lambda i: (self._batch(i), i.running_tokens, i.instance_id))
        for inst in candidates:
            if self._ttft(inst, self._uncached(request, view, inst)) > budget:
                continue
            if len(decoders) > 1:
                if self._decode_can_spare(view, healthy, roles, inst, s.tpot_headroom):
                    return inst, "prefill"
            elif self._batch(inst) <= s.mixed_max_batch:
                return inst, "both"
        return None

    def _convert_to_decode(self, request: RequestInfo, view: ClusterView,
                           healthy: Sequence[InstanceState], roles: dict[str, str],
                           prefill: InstanceState | None,
                           budget: float) -> tuple[InstanceState, str] | None:
        s, now = self.settings, view.now
        out = float(request.max_tokens)
        candidates = sorted((i for i in healthy if roles[i.instance_id] == "prefill"
                             and self._dwelt(i, now) and i is not prefill),
                            key=lambda i: (i.queued_prefill_tokens, i.load, i.instance_id))
        for inst in candidates:
            if self._tpot(inst, "decode", now, self._uncached(request, view, inst), out) > budget:
                continue
            if self._prefill_can_spare(view, healthy, roles, inst, s.ttft_headroom):
                return inst, "decode"
        return None

    def rebalance(self, view: ClusterView) -> tuple[RoleChange, ...]:
        """Send at most one instance back to its home role (see "Rebalance")."""
        self._sync(view)
        s, now = self.settings, view.now
        if now - self._restored_at < s.role_dwell_s:
            return ()
        healthy = view.healthy()
        roles: dict[str, str] = {i.instance_id: i.role for i in healthy}
        away = [i for i in healthy if self._dwelt(i, now)
                and roles[i.instance_id] != self._members[i.instance_id].home]
        for inst in sorted(away, key=lambda i: (self._members[i.instance_id].switched_at,
                                                 i.instance_id)):
            home = self._members[inst.instance_id].home
            role = roles[inst.instance_id]
            if role in PREFILL_ROLES and home not in PREFILL_ROLES and (
                    now - self._pressure_at["ttft"] < s.restore_quiet_s
                    or not self._prefill_can_spare(view, healthy, roles, inst,
                                                   s.restore_margin)):
                continue
            if role in DECODE_ROLES and home not in DECODE_ROLES and (
                    now - self._pressure_at["tpot"] < s.restore_quiet_s
                    or not self._decode_can_spare(view, healthy, roles, inst,
                                                  s.restore_margin)):
                continue
            self._restored_at = now
            return (self._switch(now, inst, roles, home, "restore"),)
        return ()

    # -- learning -----------------------------------------------------------------------------

    def _remember(self, request_id: str, pending: _Pending) -> None:
        self._pending[request_id] = pending
        while len(self._pending) > self.settings.pending_limit:
            self._pending.popitem(last=False)

    def observe(self, outcome: RequestOutcome) -> None:
        """Refine the prefill instance's TTFT model and the decode instance's TPOT model."""
        pending = self._pending.pop(outcome.request_id, None)
        if pending is None or not outcome.ok:
            return
        prefill_done_ms = outcome.queue_ms + outcome.prefill_ms
        if prefill_done_ms > 0:
            member = self._members.get(pending.prefill_id)
            if member is not None:
                member.ttft.observe(pending.prompt, pending.queued, prefill_done_ms,
                                    pending.mean_prompt)
            if outcome.prefill_instance_id is not None and outcome.ttft_ms >= prefill_done_ms:
                self._handoff.add(outcome.ttft_ms - prefill_done_ms)
        if outcome.tpot_ms is not None:
            self._tpot_seen.add(outcome.tpot_ms)
        if outcome.tpot_ms is not None and pending.pure_decode:
            member = self._members.get(pending.decode_id)
            if member is not None:
                member.tpot.observe(pending.batch, pending.tokens, outcome.tpot_ms)
