"""Jobs on a real Redis with real `labelassist worker` processes: progress, dedup, failures, and a
worker killed mid-job."""
from __future__ import annotations

import time

import pytest

import jobfns
from labelassist.jobs import RQJobRunner
from servers import descendants, kill_tree, redis_server, worker_process

pytestmark = pytest.mark.slow


def wait_for(runner, job_id, states, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = runner.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {states}: {runner.get(job_id)}")


def test_a_worker_process_runs_jobs_with_progress_without_duplicates(tmp_path):
    with redis_server(tmp_path) as url, worker_process({"REDIS_URL": url}, tmp_path / "worker.log"):
        runner = RQJobRunner(url)
        job, created = runner.submit("train", "train:7", jobfns.counting, {"steps": 5, "delay": 0.3})
        assert created and job.state in ("queued", "running")
        again, created_again = runner.submit("train", "train:7", jobfns.counting, {"steps": 5, "delay": 0.3})
        assert not created_again and again.id == job.id  # a second Train click joins the first
        running = wait_for(runner, job.id, {"running"})
        assert running.started is not None
        done = wait_for(runner, job.id, {"finished", "failed"})
        assert done.state == "finished", (done, (tmp_path / "worker.log").read_text()[-2000:])
        assert done.result == {"counted": 5} and done.progress == {"step": 5, "steps": 5}
        failed = wait_for(runner, runner.submit("train", "train:8", jobfns.refusing)[0].id, {"finished", "failed"})
        assert failed.state == "failed" and failed.error.startswith("the project has 1 annotated image")
        fresh, created_fresh = runner.submit("train", "train:7", jobfns.counting, {"steps": 1, "delay": 0})
        assert created_fresh and fresh.id != job.id  # the first one ended: a new click trains again
        assert wait_for(runner, fresh.id, {"finished", "failed"}).state == "finished"
        assert runner.counts() == {"finished": 2, "failed": 1}


def test_killing_the_worker_mid_job_fails_the_job_and_frees_its_key(tmp_path):
    with redis_server(tmp_path) as url:
        runner = RQJobRunner(url)
        with worker_process({"REDIS_URL": url}, tmp_path / "worker.log") as proc:
            job, _ = runner.submit("train", "train:1", jobfns.counting, {"steps": 200, "delay": 0.1})
            wait_for(runner, job.id, {"running"})
            while not runner.get(job.id).progress:
                time.sleep(0.05)
            assert descendants(proc.pid), "the worker runs the job in a forked work horse"
            kill_tree(proc.pid)  # the worker and its work horse, no goodbye
            proc.wait(5)
        lost = wait_for(runner, job.id, {"failed", "finished"}, timeout=30)
        assert lost.state == "failed" and "worker lost" in lost.error
        assert lost.progress["step"] < 200
        with worker_process({"REDIS_URL": url}, tmp_path / "worker2.log"):
            retry, created = runner.submit("train", "train:1", jobfns.counting, {"steps": 2, "delay": 0})
            assert created and retry.id != job.id
            assert wait_for(runner, retry.id, {"finished", "failed"}).state == "finished"
