"""The jit-compiled round: one trace per run, non-finite clients, chunking, resume."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperlora_jax import primitives
from experiments.runner import reporting
from hyperlora_jax.client import local_update
from hyperlora_jax.tasks.image_classification import apply_base_delta, frozen_tree
from experiments.runner.experiment import build_experiment
from experiments.runner import workdir as workdir_lib
from experiments.runner.workdir import restore_run
from experiments.runner.feeding import round_inputs
from experiments.runner.train import train_and_evaluate


def test_smoke_run_traces_the_round_once_and_writes_outputs(smoke_config, tmp_path):
  smoke_config.fed.num_rounds = 4
  result = train_and_evaluate(smoke_config, str(tmp_path), progress=False)
  assert result["round_traces"] == 1
  records = reporting.read_metrics(str(tmp_path))
  assert [r["round"] for r in records] == [1, 2, 3, 4]
  for r in records:
    assert 0.0 <= r["global_accuracy"] <= 1.0
    assert r["personalized_accuracy_worst"] <= r["personalized_accuracy_mean"]
    assert r["bytes_up"] > 0 and r["bytes_up"] == r["bytes_down"]
  assert records[-1]["cum_bytes_up"] == sum(r["bytes_up"] for r in records)
  assert os.path.getsize(tmp_path / "convergence.png") > 1000
  assert "global accuracy" in result["summary"]


def test_local_only_sends_nothing_and_has_no_global_model(smoke_config, tmp_path):
  smoke_config.method = "local_only"
  result = train_and_evaluate(smoke_config, str(tmp_path), progress=False)
  last = result["records"][-1]
  assert last["cum_bytes"] == 0 and last["global_accuracy"] is None
  assert 0.0 <= last["personalized_accuracy_mean"] <= 1.0


def test_kill_and_resume_gives_identical_metrics(smoke_config, tmp_path):
  smoke_config.fed.num_rounds, smoke_config.checkpoint_every = 6, 2
  train_and_evaluate(smoke_config, str(tmp_path / "straight"), progress=False)
  killed = str(tmp_path / "killed")
  train_and_evaluate(smoke_config, killed, stop_after_round=5, progress=False)
  assert len(reporting.read_metrics(str(killed))) == 5  # Round 5 ran, but only round 4 was saved.
  with pytest.raises(ValueError, match="round 4 of 6"):  # Not finished: said so.
    restore_run(smoke_config, killed)
  assert restore_run(smoke_config, killed, finished=False)[2] == 4
  result = train_and_evaluate(smoke_config, killed, progress=False)
  assert result["round_traces"] == 1
  assert reporting.read_metrics(str(killed)) == reporting.read_metrics(str(tmp_path / "straight"))
  # TensorBoard: round 5 written twice (before the kill and after), read once as TensorBoard
  # reads it (the resumed writer purges steps >= 5, as metrics.jsonl drops them; both copies
  # hold the same numbers here); every number of every record.
  (straight_events, no_purge), (killed_events, purges) = (
    _tensorboard_events(tmp_path / "straight"),
    _tensorboard_events(killed),
  )
  assert len(os.listdir(os.path.join(killed, "tensorboard"))) == 2 and (no_purge, purges) == ([], [5])
  assert killed_events == straight_events
  records = reporting.read_metrics(str(killed))
  assert {(r["round"], "train_loss") for r in records} <= set(straight_events)
  for r in records:
    assert straight_events[(r["round"], "global_accuracy")] == pytest.approx(r["global_accuracy"], rel=1e-6)
    accuracies = straight_events[(r["round"], "clients/personalized_accuracy")]
    assert accuracies["num"] == smoke_config.data.num_clients  # Each has test examples here.
    assert accuracies["sum"] / accuracies["num"] == pytest.approx(r["personalized_accuracy_mean"], rel=1e-5)
    assert accuracies["min"] == pytest.approx(r["personalized_accuracy_worst"], rel=1e-6)
  # The finished run's state, restored, gives the global accuracy its last round logged.
  from experiments.studies.global_from_clients import global_test_accuracy

  exp, state, done = restore_run(smoke_config, killed)
  frozen = apply_base_delta(frozen_tree(exp.backbone, dtype=exp.task.compute_dtype), state["base_delta"])
  assert done == 6 and int(state["round"]) == 6
  np.testing.assert_allclose(
    global_test_accuracy(exp, frozen)(exp.fed_round.global_params(state)),
    result["records"][-1]["global_accuracy"],
    atol=1e-6,
  )


def _tensorboard_events(workdir) -> tuple[dict, list[int]]:
  """({(step, tag): scalar value, or a histogram's {"num", "sum", "min", "max"}}, the purged steps)
  of the event files in workdir/tensorboard, read as TensorBoard does: files in the order written
  (TFRecord framing: length, its crc, the Event, its crc), a SessionLog START at step s dropping
  steps >= s."""
  import struct

  from tensorboardX.proto import event_pb2

  directory = os.path.join(workdir, "tensorboard")
  names = sorted(os.listdir(directory), key=lambda n: (int(n.split(".")[3]), n))
  events, purges = {}, []
  for name in names:
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        events = {k: v for k, v in events.items() if k[0] < event.step}
        purges.append(event.step)
      for value in event.summary.value if event.HasField("summary") else ():
        if value.HasField("histo"):
          h = value.histo
          events[(event.step, value.tag)] = {"num": h.num, "sum": h.sum, "min": h.min, "max": h.max}
        else:
          events[(event.step, value.tag)] = value.simple_value
  return events, purges


def test_resume_refuses_a_different_config(smoke_config, tmp_path):
  train_and_evaluate(smoke_config, str(tmp_path), stop_after_round=1, progress=False)
  smoke_config.lora.rank = 2
  with pytest.raises(ValueError, match="lora.rank"):
    train_and_evaluate(smoke_config, str(tmp_path), progress=False)


def test_corrupt_checkpoint_is_reported_not_replaced(smoke_config, tmp_path):
  smoke_config.checkpoint_every = 1
  train_and_evaluate(smoke_config, str(tmp_path), stop_after_round=2, progress=False)
  step_dir = tmp_path / "checkpoints" / "2"
  for root, _, files in os.walk(step_dir):
    for name in files:
      if not name.startswith("_"):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(RuntimeError, match="corrupt"):
    train_and_evaluate(smoke_config, str(tmp_path), progress=False)
  assert step_dir.exists()


def test_an_unreadable_config_json_is_named_not_a_bare_json_error(smoke_config, tmp_path):
  """config.json is written atomically (no .tmp left), and an unreadable one stops a resume
  naming the file, not with a bare JSONDecodeError."""
  train_and_evaluate(smoke_config, str(tmp_path), stop_after_round=1, progress=False)
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # Written whole, renamed.
  (tmp_path / "config.json").write_text("")
  with pytest.raises(ValueError, match=r"config.json is not readable JSON.*restore the file or use a new workdir"):
    train_and_evaluate(smoke_config, str(tmp_path), progress=False)


def test_a_run_whose_every_client_is_non_finite_stops_after_three_rounds(smoke_config, tmp_path):
  """A run whose every client is non-finite 3 rounds in a row (a NaN backbone, a diverging
  learning rate) stops with an error, instead of running to the end with every client left out."""
  smoke_config.client_optimizer.name, smoke_config.client_optimizer.learning_rate = "sgd", 1e30
  smoke_config.fed.num_rounds = 6
  with pytest.raises(
    FloatingPointError,
    match=r"rounds 1-3: every client's update was non-finite.*"
    r"client_optimizer.learning_rate=1e\+30",
  ):
    train_and_evaluate(smoke_config, str(tmp_path), progress=False)
  assert len(reporting.read_metrics(str(tmp_path))) == 3


def _one_round(exp, fed_round):
  state = fed_round.init(jax.random.key(0), exp.initial_trainable)
  block, ids, weights = round_inputs(exp, 0)
  return jax.jit(fed_round.step)(state, frozen_tree(exp.backbone), block, ids, weights)


def test_nonfinite_client_updates_are_left_out(smoke_config):
  exp = build_experiment(smoke_config, log=lambda _: None)
  overflowing = local_update(exp.task.loss_fn, optax.sgd(1e30))  # Every update overflows to inf/NaN.
  state, metrics = _one_round(exp, dataclasses.replace(exp.fed_round, client_update=overflowing))
  assert int(metrics["nonfinite_clients"]) == smoke_config.fed.clients_per_round
  assert int(metrics["participants"]) == 0
  assert bool(primitives.is_finite(state["global"]))
  jax.tree.map(np.testing.assert_array_equal, state["global"], exp.initial_trainable)


def test_chunked_clients_equal_one_vmap(smoke_config):
  exp = build_experiment(smoke_config, log=lambda _: None)
  results = [
    _one_round(exp, dataclasses.replace(exp.fed_round, clients_per_chunk=chunk))[0]["global"] for chunk in (0, 2)
  ]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *results)


def test_map_clients_keeps_client_order():
  xs = {"v": jnp.arange(12.0).reshape(6, 2)}
  out = primitives.map_clients(lambda x: x["v"] * 10 + 1, xs, clients_per_chunk=3, mesh=None)
  np.testing.assert_array_equal(out, xs["v"] * 10 + 1)
  with pytest.raises(ValueError, match="clients_per_chunk"):
    primitives.map_clients(lambda x: x["v"], xs, clients_per_chunk=4, mesh=None)


def test_client_evaluation_in_eval_batches_and_chunks_counts_like_a_hand_count(smoke_config):
  """Each client's accuracy from the round's evaluation (its split in batches of 16 examples,
  clients 2 at a time) equals a hand count of argmax(logits) == label over its whole split at
  once, with its own model (here: global ⊕ nothing, FedIT)."""
  from hyperlora_jax.tasks.image_classification import make_evaluate

  exp = build_experiment(smoke_config, log=lambda _: None)
  state = exp.fed_round.init(jax.random.key(0), exp.initial_trainable)
  state, _ = jax.jit(exp.fed_round.step)(state, frozen_tree(exp.backbone), *round_inputs(exp, 0))
  data = dataclasses.replace(exp.data, eval_batch=16)
  ids, block = next(data.client_test_blocks(multiple=2))
  n_max = max(len(p) for p in exp.data.test_parts)
  assert block["label"].shape[1] == -(-n_max // 16) * 16 > 16  # Padded to whole batches.
  evaluation = make_evaluate(exp.task, dataclasses.replace(exp.fed_round, clients_per_chunk=2), eval_batch=16)
  got = np.asarray(jax.jit(evaluation.client_accuracy)(state, frozen_tree(exp.backbone), ids, block))
  for c in range(len(exp.data.test_parts)):
    logits = exp.task.logits(frozen_tree(exp.backbone), state["global"], block["image"][c])
    mask = block["mask"][c] > 0
    expected = np.mean(np.asarray(jnp.argmax(logits, -1))[mask] == block["label"][c][mask])
    assert abs(got[c] - expected) < 1e-6, (c, got[c], expected)


def test_a_torn_last_metrics_line_is_dropped_and_a_corrupt_one_is_named(tmp_path):
  """A run killed while appending leaves a last line without newline: resume drops it. A broken
  line anywhere else is an error naming the file and line, not a bare JSONDecodeError."""
  path = tmp_path / reporting.METRICS_FILE
  path.write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "train_lo')
  assert reporting.read_metrics(str(tmp_path)) == [{"round": 1}, {"round": 2}]
  reporting.truncate_metrics(str(tmp_path), 2)
  assert path.read_text() == '{"round": 1}\n{"round": 2}\n'
  path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl line 2"):
    reporting.read_metrics(str(tmp_path))


def test_lost_metrics_are_rebuilt_from_the_checkpoint_and_a_lost_config_is_refused(smoke_config, tmp_path):
  """Deleted metrics.jsonl: the copy kept with the checkpoint rebuilds it (no round missing,
  cum_bytes continued), and the finished run's metrics equal an
  unbroken run's; without that copy it is refused. Deleted config.json: the different-config
  guard would be off, so that is refused, files untouched."""
  smoke_config.fed.num_rounds = 4
  train_and_evaluate(smoke_config, str(tmp_path / "straight"), progress=False)
  work = tmp_path / "broken"
  train_and_evaluate(smoke_config, str(work), stop_after_round=3, progress=False)  # Checkpoint at 2.
  assert sorted(p.name for p in (work / "checkpoints").glob("metrics-*.jsonl")) == ["metrics-2.jsonl"]
  metrics = work / reporting.METRICS_FILE
  saved = metrics.read_text()
  metrics.unlink()
  train_and_evaluate(smoke_config, str(work), progress=False)
  assert reporting.read_metrics(str(work)) == reporting.read_metrics(str(tmp_path / "straight"))
  assert sorted(p.name for p in (work / "checkpoints").glob("metrics-*.jsonl")) == [
    "metrics-2.jsonl",
    "metrics-4.jsonl",
  ]
  work2 = tmp_path / "no_copy"
  train_and_evaluate(smoke_config, str(work2), stop_after_round=2, progress=False)
  (work2 / reporting.METRICS_FILE).unlink()
  (work2 / "checkpoints" / "metrics-2.jsonl").unlink()
  with pytest.raises(RuntimeError, match="lacks rounds of the 2 .* holds no copy"):
    train_and_evaluate(smoke_config, str(work2), progress=False)
  metrics.write_text(saved)
  (work / "config.json").unlink()
  with pytest.raises(Exception, match="no config.json"):
    train_and_evaluate(smoke_config, str(work), progress=False)
  assert (work / "checkpoints" / "4").exists()


def test_a_workdir_in_use_is_refused(smoke_config, tmp_path):
  from experiments.runner.workdir import workdir_lock

  with workdir_lock(str(tmp_path)):
    with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
      train_and_evaluate(smoke_config, str(tmp_path), progress=False)
    assert not (tmp_path / reporting.METRICS_FILE).exists()
  smoke_config.fed.num_rounds = 1
  assert len(train_and_evaluate(smoke_config, str(tmp_path), progress=False)["records"]) == 1  # Released.


def test_smoke_runs_learn_above_chance(smoke_config, tmp_path):
  """The smoke backbone is pretrained to about 69% on its grey digits, so a smoke run learns:
  tests that rely on learning (not only on running) have something to measure. Chance is 10%."""
  smoke_config.fed.num_rounds = 5
  result = train_and_evaluate(smoke_config, str(tmp_path), progress=False, log=lambda _: None)
  first, last = result["records"][0], result["records"][-1]
  assert last["global_accuracy"] > 0.14 and last["global_accuracy"] > first["global_accuracy"]
  assert last["train_loss"] < first["train_loss"]


def test_shifted_evaluation_reaches_every_test_block_and_severity_zero_is_the_runs_own(
  smoke_config, tmp_path, monkeypatch
):
  """`run_evaluator`'s `transform_images` and `experiments.studies.shift_severity` on a finished run."""
  from experiments.studies import shift_severity
  from experiments.runner.evaluation import run_evaluator

  smoke_config.fed.num_rounds = 2
  run = tmp_path / "runs" / "fedit"
  last = train_and_evaluate(smoke_config, str(run), progress=False)["records"][-1]
  config = workdir_lib.recorded_config(str(run))  # Rebuilt from config.json; checked equal.
  assert (config.method, config.fed.num_rounds, config.model.width) == ("fedit", 2, smoke_config.model.width)
  exp, state, _ = restore_run(config, str(run))
  frozen = frozen_tree(exp.backbone, dtype=exp.task.compute_dtype)
  evaluate = run_evaluator(exp)
  seen = []

  def blank(images):  # Every image black: a model then predicts one class for all of them.
    seen.append(images.shape)
    return np.zeros_like(images)

  global_blank, clients_blank = evaluate(state, frozen, blank)()
  assert sorted(len(s) for s in seen) == [4, 5]  # The global block [M, H, W, 3] and the clients' [c, n, H, W, 3].
  test_labels = [exp.data.test_pool.labels[p] for p in exp.data.test_parts]
  assert global_blank <= np.bincount(np.concatenate(test_labels)).max() / sum(map(len, test_labels)) + 1e-6
  for accuracy, labels in zip(clients_blank, test_labels):  # At most each client's majority share.
    assert accuracy <= np.bincount(labels).max() / len(labels) + 1e-6
  assert evaluate(state, frozen)()[0] == last["global_accuracy"]  # The clean blocks stay cached.
  out = tmp_path / "shift.md"
  argv = [str(tmp_path / "runs"), "--methods", "fedit", "--kinds", "contrast", "--out", str(out)]
  shift_severity.main(argv)
  rows = json.loads((tmp_path / "shift.json").read_text())
  assert sorted(r["severity"] for r in rows) == list(range(6))
  (clean,) = [r for r in rows if r["severity"] == 0]
  assert (clean["global"], clean["pers_mean"]) == (last["global_accuracy"], last["personalized_accuracy_mean"])
  assert f"| {run} | +0.00 | +0.00 |" in out.read_text()
  report = out.read_text()
  monkeypatch.setattr(shift_severity, "severity_accuracies", lambda *_: pytest.fail("evaluated again"))
  shift_severity.main(argv)  # Every run is in shift.json already: nothing is evaluated again.
  assert out.read_text() == report
