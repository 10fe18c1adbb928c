import threading

from labelassist.jobs import JobFailed, JobRunner


def test_job_runs_in_background_and_reports_progress():
    runner = JobRunner()
    gate = threading.Event()

    def work(progress):
        progress({"epoch": 1, "epochs": 2})
        gate.wait(5)
        progress({"epoch": 2})
        return {"version": "v2"}

    job, created = runner.submit("train", "train:1", work)
    assert created and job.state in ("queued", "running")
    again, created_again = runner.submit("train", "train:1", work)  # second click: same job
    assert again.id == job.id and not created_again
    gate.set()
    done = runner.wait(job.id, 5)
    assert done.state == "finished" and done.result == {"version": "v2"}
    assert done.progress == {"epoch": 2, "epochs": 2}
    third, created_third = runner.submit("train", "train:1", work)  # finished: a new job may start
    assert created_third and third.id != job.id


def test_failures_are_recorded_not_raised():
    runner = JobRunner()

    def clear(progress):
        raise JobFailed("Label Studio unreachable at http://127.0.0.1:1")

    def crash(progress):
        raise ZeroDivisionError("boom")

    a, _ = runner.submit("train", "a", clear)
    b, _ = runner.submit("train", "b", crash)
    assert runner.wait(a.id, 5).error == "Label Studio unreachable at http://127.0.0.1:1"
    assert runner.wait(b.id, 5).state == "failed" and "ZeroDivisionError" in runner.get(b.id).error
    assert runner.counts() == {"failed": 2}
