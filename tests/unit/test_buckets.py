"""The token buckets the sync budget, the author budget and the DNS limit share."""

from formation.buckets import TokenBuckets


def test_take_spends_only_what_is_there_and_charge_may_go_into_debt():
    now = [0.0]
    b = TokenBuckets(rate=2, capacity=4, clock=lambda: now[0])
    assert b.tokens("a") == 4 and b.take("a", 3) and not b.take("a", 2)
    assert b.tokens("a") == 1
    b.charge("a", 5)  # an answer already allowed: sent whole
    assert b.tokens("a") == -4
    now[0] += 2.5  # refills at 2 per second, never above capacity
    assert b.tokens("a") == 1 and b.tokens("fresh") == 4
    now[0] += 100
    assert b.tokens("a") == 4


def test_at_most_max_keys_are_kept_full_ones_first_then_the_least_recently_charged():
    now = [0.0]
    b = TokenBuckets(rate=1, capacity=10, max_keys=3, clock=lambda: now[0])
    for k in "abc":
        b.charge(k, 10)
    b.charge("a", 0)  # charged again: the oldest is now b
    b.charge("d", 1)
    assert len(b) == 3 and b.tokens("b") == 10  # forgotten: full again
    assert b.tokens("a") == 0 and b.tokens("c") == 0
    now[0] += 10  # a, c and d refill; one in debt stays remembered
    b.charge("e", 50)
    b.charge("f", 1)
    assert len(b) == 2 and b.tokens("e") == -40
