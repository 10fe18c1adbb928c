"""Job functions an RQ worker process imports by name in tests (module-level, like real jobs)."""
import time

from labelassist.jobs import JobFailed


def counting(progress, steps: int, delay: float) -> dict:
    for step in range(1, steps + 1):
        time.sleep(delay)
        progress({"step": step, "steps": steps})
    return {"counted": steps}


def refusing(progress) -> dict:
    raise JobFailed("the project has 1 annotated image; training needs at least 4")
