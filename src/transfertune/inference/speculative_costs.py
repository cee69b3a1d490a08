"""What speculative decoding measures as it runs, and the draft length it picks from that.

A round drafts k tokens per row (k + 1 draft steps), verifies k + 1 per row in one target pass, then does its
bookkeeping (composition, verdicts, cache commits). Each cost is timed and fitted by a line in the batch's size,
so the model holds while rows join and leave; the acceptance rate is pooled over every round.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("draft", "verify", "bookkeeping", "prefill", "between")  # prefill: rows joining; between: the caller's
# work between rounds (finished rows leaving, end-of-sequence and stop checks)


@dataclass
class LinearCost:
    """Seconds as a least-squares line in a size (rows, or tokens), through every measurement so far."""

    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, x, y, xx, xy

    def add(self, size: float, seconds: float) -> None:
        for i, term in enumerate((1, size, seconds, size * size, size * seconds)):
            self.sums[i] += term

    def __call__(self, size: float) -> float:
        n, x, y, xx, xy = self.sums
        if not n:
            return 0.0
        spread = n * xx - x * x
        slope = max(0.0, (n * xy - x * y) / spread) if spread > 1e-9 else 0.0
        return (y - slope * x) / n + slope * size


RECENT_ROUNDS = 4096


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0  # drafted tokens, summed over rows
    accepted: int = 0
    rejected: int = 0  # rows x rounds that ended at a rejected drafted token
    committed: int = 0  # tokens committed to rows (accepted + one per row and round)
    draft_tokens: int = 0  # draft lengths summed over rounds
    # the latest rounds' draft lengths (at most 2 x RECENT_ROUNDS kept: a server runs rounds forever)
    draft_lengths: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    draft_step: LinearCost = field(default_factory=LinearCost)  # seconds per draft step, in rows
    verify: LinearCost = field(default_factory=LinearCost)  # seconds per verification, in tokens (rows x (k + 1))
    bookkeeping: LinearCost = field(default_factory=LinearCost)  # seconds per round, in rows

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add_round(self, rows: int, k: int, accepted: list[int], committed: int, draft_steps: int,
                  seconds: tuple[float, float, float]) -> None:
        draft, verify, bookkeeping = seconds
        self.rounds += 1
        self.drafted += k * rows
        self.accepted += sum(accepted)
        self.rejected += sum(a < k for a in accepted)
        self.committed += committed
        self.draft_tokens += k
        self.draft_lengths.append(k)
        if len(self.draft_lengths) > 2 * RECENT_ROUNDS:
            del self.draft_lengths[:-RECENT_ROUNDS]
        for phase, s in zip(PHASES[:3], seconds):
            self.seconds[phase] += s
        self.draft_step.add(rows, draft / max(1, draft_steps))
        self.verify.add(rows * (k + 1), verify)
        self.bookkeeping.add(rows, bookkeeping)

    def round_seconds(self, k: int, rows: int) -> float:
        return (k + 1) * self.draft_step(rows) + self.verify(rows * (k + 1)) + self.bookkeeping(rows)

    def best_draft_len(self, longest: int, rows: int = 1, per_row: bool = True) -> int:
        """The draft length that commits the most tokens per second. Each drafted token is accepted with
        probability a (estimated from every round so far, prior 3 of 4), so a row commits (1 - a^(k+1)) / (1 - a)
        tokens in a round of k drafted tokens. With `per_row` commits every row keeps its own; otherwise a
        batch keeps a token only when all its rows accept it (a^rows). Costs are the fitted lines."""
        a = min((self.accepted + 3) / (self.accepted + self.rejected + 4), 0.99)
        if not per_row:
            a **= rows

        def tokens_per_second(k):
            return rows * (1 - a ** (k + 1)) / (1 - a) / max(self.round_seconds(k, rows), 1e-9)

        return max(range(1, longest + 1), key=tokens_per_second)
