"""The engine's pure policy: planning, retries with backoff, giving up, the error-rate stop."""

from __future__ import annotations

from pipeline.config import RetryConfig
from pipeline.core.scheduler import Scheduler, ShardResult, backoff_delay, pending_shards


def _result(name: str, read: int = 10, errored: int = 0, attempt: int = 1) -> ShardResult:
    return ShardResult(name=name, samples_read=read, samples_written=read - errored, samples_errored=errored,
                       bytes=100, seconds=1.0, attempt=attempt,
                       counters={"fp32_fallbacks": 1})


def test_plan_skips_committed_shards_only():
    shards = {"a": "s3://x/a.tar", "b": "s3://x/b.tar", "c": "s3://x/c.tar"}
    assert pending_shards(shards, {"b"}) == {"a": "s3://x/a.tar", "c": "s3://x/c.tar"}
    assert pending_shards(shards, {"a", "b", "c"}) == {}


def test_backoff_grows_and_is_capped():
    retry = RetryConfig(max_attempts=10, backoff_s=2.0, backoff_max_s=10.0)
    assert [backoff_delay(a, retry) for a in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_failed_shard_is_retried_after_backoff_then_given_up():
    sched = Scheduler({"a": "u/a.tar"}, RetryConfig(max_attempts=2, backoff_s=5.0, backoff_max_s=60.0))
    t = sched.next_task(now=0.0)
    assert (t.name, t.attempt) == ("a", 1)
    assert sched.next_task(now=0.0) is None  # running, not queued twice
    assert sched.failed_attempt("a", "S3 flaked", now=1.0) == 6.0
    assert sched.next_task(now=5.9) is None  # still backing off
    assert sched.next_ready_at() == 6.0
    t2 = sched.next_task(now=6.0)
    assert (t2.name, t2.attempt) == ("a", 2)
    assert sched.failed_attempt("a", "S3 flaked again", now=7.0) is None
    assert sched.finished and "failed 2 time(s)" in sched.failed["a"] and "flaked again" in sched.failed["a"]


def test_other_shards_run_while_one_backs_off():
    sched = Scheduler({"a": "u/a", "b": "u/b"}, RetryConfig(max_attempts=3, backoff_s=10.0, backoff_max_s=10.0))
    a = sched.next_task(0.0)
    sched.failed_attempt(a.name, "boom", 0.0)
    b = sched.next_task(1.0)
    assert b.name == "b"
    sched.succeeded(_result("b"))
    assert not sched.finished
    again = sched.next_task(10.0)
    assert (again.name, again.attempt) == ("a", 2)
    sched.succeeded(_result("a", attempt=2))
    assert sched.finished and set(sched.done) == {"a", "b"} and not sched.failed


def test_error_rate_stop_waits_for_enough_samples():
    sched = Scheduler({n: n for n in "abc"}, RetryConfig(), max_error_rate=0.1, min_samples_for_error_rate=25)
    for name in "ab":
        sched.next_task(0.0)
        sched.succeeded(_result(name, read=10, errored=3))
    assert sched.error_rate_exceeded() is None  # 20 samples < 25: too early to judge
    sched.next_task(0.0)
    sched.succeeded(_result("c", read=10, errored=0))
    message = sched.error_rate_exceeded()
    assert message is not None and "6 of 30 samples failed (20.0%)" in message


def test_error_rate_within_threshold_is_fine():
    sched = Scheduler({"a": "a"}, RetryConfig(), max_error_rate=0.5, min_samples_for_error_rate=1)
    sched.next_task(0.0)
    sched.succeeded(_result("a", read=10, errored=5))
    assert sched.error_rate_exceeded() is None
    assert sched.totals() == (10, 5, 5)


def test_permanent_failure_is_given_up_at_once_and_counters_add_up():
    sched = Scheduler({"a": "u/a", "b": "u/b"}, RetryConfig(max_attempts=5, backoff_s=1.0, backoff_max_s=8.0))
    a = sched.next_task(0.0)
    assert sched.failed_attempt(a.name, "made with another VAE", 0.0, permanent=True) is None
    assert sched.failed == {"a": "cannot succeed; last error: made with another VAE"}
    b = sched.next_task(0.0)
    sched.succeeded(_result(b.name))
    assert sched.finished and sched.counters() == {"fp32_fallbacks": 1}


def test_error_rate_counts_the_whole_job_not_this_run():
    """A rerun of a job whose committed shards already failed too many samples still stops
    (issue 8, defect 5): the shards committed before count too."""
    retry = RetryConfig(max_attempts=1)
    clean_rerun = Scheduler({"c": "u/c"}, retry, max_error_rate=0.05, min_samples_for_error_rate=10,
                            committed_read=100, committed_errored=26)
    assert "26 of 100 samples failed (26.0%)" in clean_rerun.error_rate_exceeded()
    task = clean_rerun.next_task(0.0)
    clean_rerun.succeeded(_result(task.name, read=100, errored=0))
    assert "26 of 200 samples failed (13.0%)" in clean_rerun.error_rate_exceeded()
    fine = Scheduler({}, retry, max_error_rate=0.05, min_samples_for_error_rate=10, committed_read=100,
                     committed_errored=5)
    assert fine.error_rate_exceeded() is None


def test_a_task_lost_before_it_started_is_requeued_free_up_to_a_limit():
    sched = Scheduler({"a": "u/a", "b": "u/b"}, RetryConfig(max_attempts=1, max_unstarted=2))
    assert sched.next_task(0.0).name == "a"
    assert sched.lost_unstarted("a")
    assert sched.next_task(0.0).name == "b", "requeued at the back: losses spread over the shards"
    assert sched.next_task(0.0).name == "a" and sched.lost_unstarted("a")  # still attempt 1
    again = sched.next_task(0.0)
    assert (again.name, again.attempt) == ("a", 1) and sched.attempts_failed == 0
    assert not sched.lost_unstarted("a"), "past max_unstarted the caller charges it"
    assert sched.failed_attempt("a", "actor died", 0.0) is None
    assert "failed 1 time(s)" in sched.failed["a"] and sched.attempts_failed == 1
