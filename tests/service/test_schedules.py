"""The registry's promotion history, the schedule's slots, the promotion gate and one run per slot under
concurrent ticks — on SQLite and PostgreSQL, in-process (the live flow is in test_schedule_flow.py)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from distill.data.coco import load_coco
from distill.errors import InputError
from distill.storage import Storage
from service import registry, schedules
from service.config import Settings
from service.datasets import Conflict, NotFound, create_dataset, delete_dataset, ingest, put_annotations
from service.db import make_engine, session_factory, transaction
from service.models import Base, Dataset, Job, Model, Schedule, ScheduleRun, aware
from service.runtime import Runtime

UTC = dt.UTC


@pytest.fixture
def sessions(db_url: str):
    engine = make_engine(db_url)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


def _model(session, name: str, key: str) -> Model:
    return registry.register_model(session, name=name, key=key, backend="torchvision", source="upload")


def test_the_migrations_build_exactly_the_tables_of_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()


def test_promotions_and_rollbacks_walk_the_history_and_name_who_and_why(sessions) -> None:
    with transaction(sessions) as session:
        v1, v2, v3 = (_model(session, "det", f"models/det/v{i}") for i in (1, 2, 3))
        assert registry.promoted_model(session, "det").id == v1.id  # the first version, on its own
        registry.promote(session, v2, reason="won on site A", created_by=7)
        registry.promote(session, v3, reason="won again")
        with pytest.raises(Conflict, match="already the promoted version"):
            registry.promote(session, v3)
        with pytest.raises(Conflict, match="changed from v1 to v3 meanwhile"):
            registry.promote(session, v2, expected=v1)  # a gate that compared against v1
        assert registry.rollback(session, "det", reason="regressed").model_id == v2.id
        assert registry.rollback(session, "det").model_id == v1.id
        with pytest.raises(Conflict, match="no earlier promoted version"):
            registry.rollback(session, "det")
        with pytest.raises(NotFound):
            registry.rollback(session, "other")
        assert registry.promoted_model(session, "det").id == v1.id
        history = [(p.action, p.model_id, p.undone, p.reason) for p in registry.promotions(session, "det")]
        assert history == [
            ("rollback", v1.id, False, ""),
            ("rollback", v2.id, False, "regressed"),
            ("promote", v3.id, True, "won again"),
            ("promote", v2.id, True, "won on site A"),
            ("promote", v1.id, False, "first version"),
        ]
        # promoted again after the rollbacks: the history grows, rollback goes back to v1 again
        registry.promote(session, v3, reason="fixed")
        assert registry.rollback(session, "det").model_id == v1.id


def test_a_model_named_by_name_is_its_promoted_version(sessions) -> None:
    with transaction(sessions) as session:
        v1, v2 = _model(session, "det", "k1"), _model(session, "det", "k2")
        registry.promote(session, v2)
        model, how = registry.resolve_model(session, "teacher.model", "det")
        assert model.id == v2.id and how == {"id": v2.id, "name": "det", "version": 2, "by": "promoted"}
        assert registry.resolve_model(session, "teacher", v1.id)[1]["by"] == "id"
        with pytest.raises(InputError, match="teacher: 'nope' is not a registered model name"):
            registry.resolve_model(session, "teacher", "nope")
        with pytest.raises(InputError, match="model: model 99 does not exist"):
            registry.resolve_model(session, "model", 99)


def _schedule(**fields) -> Schedule:
    base = {"name": "s", "cron": "0 3 * * *", "timezone": "Europe/Paris", "model": "det", "labeled": 1,
            "unlabeled": 2, "eval": 3, "updated_at": dt.datetime(2026, 3, 1, tzinfo=UTC)}  # fmt: skip
    return Schedule(**{**base, **fields})


def test_slots_follow_the_time_zone_and_only_the_latest_due_one_counts() -> None:
    schedule = _schedule()
    # 03:00 in Paris is 02:00 UTC in winter, 01:00 UTC after the switch to summer time (29 March 2026)
    runs = schedules.next_runs("0 3 * * *", "Europe/Paris", dt.datetime(2026, 3, 27, 12, tzinfo=UTC), 3)
    assert [r.astimezone(UTC).hour for r in runs] == [2, 1, 1]
    due = schedules.due_slot(schedule, dt.datetime(2026, 3, 28, 2, 0, 30, tzinfo=UTC))
    assert due == dt.datetime(2026, 3, 28, 2, tzinfo=UTC)
    assert schedules.due_slot(schedule, dt.datetime(2026, 3, 28, 2, tzinfo=UTC)) == due  # on the slot itself
    # days later (beat was down): the latest slot only, not a catch-up of every missed one
    assert schedules.due_slot(schedule, dt.datetime(2026, 4, 2, 9, tzinfo=UTC)) == dt.datetime(
        2026, 4, 2, 1, tzinfo=UTC
    )
    # slots before the schedule's last change never run
    assert schedules.due_slot(schedule, dt.datetime(2026, 3, 1, 1, tzinfo=UTC)) is None
    with pytest.raises(InputError, match="random \\(R\\) and hashed \\(H\\) fields"):
        schedules.check_cron("R 3 * * *")  # croniter would pick another minute at each parse
    with pytest.raises(InputError, match="cron: 'H 3 \\* \\* \\*'"):
        schedules.check_cron("H 3 * * *")
    with pytest.raises(InputError, match="cron: '0 3 \\* \\*' is not a cron expression"):
        schedules.check_cron("0 3 * *")
    with pytest.raises(InputError, match="timezone"):
        schedules.next_runs("0 3 * * *", "Nowhere/City", dt.datetime.now(UTC))


def test_every_slot_runs_once_across_the_night_the_clocks_go_back() -> None:
    """Paris leaves summer time on 27 October 2024 at 01:00 UTC (03:00 CEST → 02:00 CET): ticks every five
    minutes see every hourly slot once, in order, and 02:30 local, which happens twice, as two slots."""

    def slots(cron: str) -> list[str]:
        schedule = _schedule(cron=cron, updated_at=dt.datetime(2024, 10, 20, tzinfo=UTC))
        seen: list[dt.datetime] = []
        moment = dt.datetime(2024, 10, 26, 22, 1, tzinfo=UTC)
        while moment < dt.datetime(2024, 10, 27, 4, tzinfo=UTC):
            slot = schedules.due_slot(schedule, moment)
            if slot is not None and slot > dt.datetime(2024, 10, 26, 21, tzinfo=UTC) and slot not in seen:
                seen.append(slot)
            moment += dt.timedelta(minutes=5)
        return [s.strftime("%H:%M") for s in seen]

    assert slots("0 * * * *") == ["22:00", "23:00", "00:00", "01:00", "02:00", "03:00"]
    assert slots("30 2 * * *") == ["00:30", "01:30"]


def _job_with_gate(session, teacher: Model) -> Job:
    job = Job(type="pipeline", spec={"promote": {"name": teacher.name, "teacher_id": teacher.id},
                                     "config": {"evaluation": {"min_gain": 0.01}}})  # fmt: skip
    session.add(job)
    session.flush()
    return job


def test_the_gate_promotes_a_winning_healthy_student_over_the_teacher_it_was_compared_with(sessions) -> None:
    with transaction(sessions) as session:
        teacher, student = _model(session, "det", "t"), _model(session, "det", "s")
        other = _model(session, "det", "o")
        job = _job_with_gate(session, teacher)
        won = {"promoted": True, "teacher": "t", "student": "s", "health": [],
               "primary": {"metric": "bbox/AP", "teacher": 0.30, "student": 0.35}}  # fmt: skip
        sick = schedules.apply_gate(session, job, {**won, "health": ["pseudo-labels collapsed: 0.01 ..."]})
        assert not sick["promoted"] and sick["reason"].startswith("failed the health checks: pseudo-labels")
        lost = schedules.apply_gate(session, job, {**won, "promoted": False})
        assert (
            not lost["promoted"]
            and "did not beat" in lost["reason"]
            and "min_gain 1 (AP points)" in (lost["reason"])
        )
        assert registry.promoted_model(session, "det").id == teacher.id
        outcome = schedules.apply_gate(session, job, won)
        assert outcome["promoted"] and outcome["version"] == 2 and "student 35.0 beat" in outcome["reason"]
        assert registry.promoted_model(session, "det").id == student.id
        assert registry.promotions(session, "det")[0].job_id == job.id
        # someone promoted another version while a second job ran: its gate does not overrule them
        registry.promote(session, other)
        late = schedules.apply_gate(session, _job_with_gate(session, student), {**won, "teacher": "s"})
        assert not late["promoted"] and late["reason"] == (
            "not promoted: det: the promoted version changed from v2 to v3 meanwhile"
        )
        assert registry.promoted_model(session, "det").id == other.id
        assert schedules.apply_gate(session, Job(type="pipeline", spec={}), won) is None  # no gate


def _datasets(sessions, storage: Storage, tiny_data: Path) -> dict[str, int]:
    ids = {}
    for role, split, kind in (("labeled", "labeled", "labeled"), ("unlabeled", "unlabeled", "unlabeled"),
                              ("eval", "test", "eval")):  # fmt: skip
        with transaction(sessions) as session:
            ids[role] = create_dataset(session, storage, name=split, kind=kind).id
        coco = load_coco(tiny_data / f"{split}.json")
        files = [(im["file_name"], (tiny_data / "images" / im["file_name"]).open("rb")) for im in coco.images]
        ingest(sessions, storage, ids[role], files)
        for _, handle in files:
            handle.close()
        if kind != "unlabeled":
            with (tiny_data / f"{split}.json").open("rb") as handle:
                put_annotations(sessions, storage, ids[role], f"{split}.json", handle)
    return ids


def test_concurrent_ticks_start_one_job_per_slot_and_record_skips_once(
    sessions, tmp_path: Path, tiny_data: Path
) -> None:
    storage = Storage(tmp_path / "storage")
    sent: list[tuple] = []
    runtime = Runtime(Settings(shard_size=8), sessions, storage, lambda *unit: sent.append(unit))
    ids = _datasets(sessions, storage, tiny_data)
    with transaction(sessions) as session:
        _model(session, "det", "models/det")
        created = dt.datetime(2026, 1, 1, tzinfo=UTC)
        pipeline = {"inference": {"views": "1x"}, "student": {"iterations": 2}}
        start = Schedule(name="a", cron="*/5 * * * *", timezone="UTC", model="det", pipeline=pipeline,
                         updated_at=created, **ids)  # fmt: skip
        skip = Schedule(name="b", cron="*/5 * * * *", timezone="UTC", model="det", min_new_images=10**6,
                        updated_at=created, **ids)  # fmt: skip
        session.add_all([start, skip])
    now = dt.datetime(2026, 1, 1, 0, 7, tzinfo=UTC).timestamp()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def tick() -> None:
        try:
            barrier.wait()
            schedules.tick(runtime, now)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=tick) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    with transaction(sessions) as session:
        runs = {s: [(r.slot, r.state) for r in session.query(ScheduleRun).filter_by(schedule_id=s)]
                for s in (start.id, skip.id)}  # fmt: skip
        slot = dt.datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
        assert [(aware(t), state) for t, state in runs[start.id]] == [(slot, "started")]
        assert [(aware(t), state) for t, state in runs[skip.id]] == [(slot, "skipped")]
        jobs = session.query(Job).all()
        assert len(jobs) == 1 and jobs[0].spec["schedule"]["slot"] == slot.isoformat()
        assert jobs[0].spec["models"]["teacher"]["by"] == "promoted"
    assert sent == [(jobs[0].id, "evaluate_teacher", 0, "gpu")]  # the first stage, sent once

    # a slot chosen before a pause or an edit records nothing: the tick re-checks under the row's lock
    later = dt.datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
    with transaction(sessions) as session:
        session.get(Schedule, skip.id).updated_at = dt.datetime(2026, 1, 1, 0, 11, tzinfo=UTC)  # edited
        session.get(Schedule, start.id).paused = True
    assert schedules.run_slot(runtime, skip.id, later) is None
    assert schedules.run_slot(runtime, start.id, later) is None
    with transaction(sessions) as session:
        assert session.query(ScheduleRun).count() == 2 and session.query(Job).count() == 1
        session.query(Job).one().state = "cancelled"  # no job holds the datasets now: the schedules do

    # a dataset a schedule names is not deleted from under it
    with pytest.raises(Conflict, match=r"is used by schedule\(s\) a, b: edit or delete them first"):
        delete_dataset(sessions, storage, ids["eval"])
    with transaction(sessions) as session:
        assert session.get(Dataset, ids["eval"]) is not None


def test_storage_options_come_from_json_and_an_empty_variable_is_unset(monkeypatch) -> None:
    monkeypatch.setenv("DISTILL_STORAGE_OPTIONS", '{"key_filename": "/keys/id", "port": 2222}')
    monkeypatch.setenv("DISTILL_SCHEDULE_TICK_SECONDS", "5")
    settings = Settings()
    assert settings.storage_options == {"key_filename": "/keys/id", "port": 2222}
    assert settings.schedule_tick_seconds == 5.0
    monkeypatch.setenv("DISTILL_STORAGE_OPTIONS", "")
    monkeypatch.setenv("DISTILL_SCHEDULE_TICK_SECONDS", "")
    assert Settings().storage_options == {} and Settings().schedule_tick_seconds == 30.0
