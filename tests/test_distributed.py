"""Data- and population-parallel EDropout on 2 gloo processes against one process: the same energies, the same
best-state trajectory with a DDP-wrapped model (reference backend and the CPU kept-channel path), identical states
on every rank, clear errors when ranks disagree or drift apart, and the main job under torchrun killed mid-epoch
and resumed. One torchrun job (killed) and one spawn (every other scenario, ``distributed_cases.run_all``) serve
the whole module; the one-process references run here."""
import json
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_cases as cases
from edropout import EDropout
from idx_files import write_fashion_like
from tolerances import assert_close

WORLD = 2
MODES = ("data", "population")


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    """The module's directory, holding the main job's data set."""
    found = tmp_path_factory.mktemp("distributed")
    (found / cases.DATA).mkdir()
    write_fashion_like(found / cases.DATA, n_train=512, n_test=64, size=8)
    return found


@pytest.fixture(scope="module")
def killed(directory):
    """(epoch of the last checkpoint, output) of the torchrun job killed mid-run; its resume runs in ``ranks``."""
    return cases.start_and_kill(str(directory))


@pytest.fixture(scope="module")
def ranks(directory, killed):
    """What each of the 2 ranks saw, one dict per rank."""
    mp.spawn(cases.worker, args=(WORLD, str(directory / "store"), str(directory)), nprocs=WORLD)
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    """The same scenarios in this process, on whole batches (memoised per scenario)."""
    found = {}

    def get(kind, backend, parallel, net_name="lenet"):
        key = (kind, backend, parallel, net_name)
        if key not in found:
            if kind == "energies":
                found[key] = cases.energies_case(backend, parallel, net_name=net_name)
            else:
                found[key] = cases.trajectory_case(backend, parallel)
        return found[key]

    return get


def margin_by_hand(states, x, y):
    """Mean margin energy max_{j≠y} z_j − z_y of each state over the whole batch, one masked forward each."""
    net = cases.model()
    pruner = EDropout(net, x[:2], population_size=4, backend="reference")
    out = []
    with torch.no_grad():
        for state in states:
            with pruner.apply(state):
                z = net(x)
            rows = torch.arange(len(y))
            others = z.clone()
            others[rows, y] = float("-inf")
            out.append((others.max(dim=1).values - z[rows, y]).mean())
    return torch.stack(out).float()


@pytest.mark.parametrize("backend", cases.BACKENDS)
@pytest.mark.parametrize("parallel", MODES)
def test_energies_equal_one_process_on_the_whole_batch(ranks, one_process, backend, parallel):
    # data mode: rank 0 scored 7 rows and rank 1 the other 6; population mode: 3 members each, 5 states 3 + 2
    x, y = cases.batch(13)
    mine, theirs = ranks[0]["energies", backend, parallel], ranks[1]["energies", backend, parallel]
    whole = one_process("energies", backend, parallel)
    assert torch.equal(mine["population"], whole["population"])
    for key in ("energies", "state_energies"):
        assert torch.equal(mine[key], theirs[key])
        assert_close(mine[key], whole[key], rtol=1e-6, msg=key)  # float32 energies of float64 logits
    assert_close(mine["energies"], margin_by_hand(whole["population"], x, y), rtol=1e-6)
    assert_close(mine["state_energies"], margin_by_hand(whole["states"], x, y), rtol=1e-6)


def test_batchnorm_statistics_per_shard_in_data_mode_and_whole_batch_in_population_mode(ranks):
    # data mode normalises each rank's shard with its own statistics (as DDP without SyncBatchNorm): the
    # energies are the row-weighted mean of the shards' energies; population mode scores the whole batch
    x, y = cases.batch(13, classes=4)
    net = cases.model("concat")
    pruner = EDropout(net, x[:2], population_size=6, backend="reference", seed=3)
    population = ranks[0]["energies", "batchnorm", "data"]["population"]
    assert torch.equal(population, pruner.population)
    (x0, x1), (y0, y1) = x.tensor_split(2), y.tensor_split(2)
    per_shard = (7 * pruner.energies(x0, y0).double() + 6 * pruner.energies(x1, y1).double()) / 13
    data = ranks[0]["energies", "batchnorm", "data"]["energies"]
    assert_close(data, per_shard, rtol=1e-6)
    whole = pruner.energies(x, y)
    assert (data - whole).abs().max() > 1e-4  # the shards' statistics really differ from the batch's
    for r in range(WORLD):
        assert_close(ranks[r]["energies", "batchnorm", "population"]["energies"], whole, rtol=1e-6)


@pytest.mark.parametrize("backend", cases.BACKENDS)
@pytest.mark.parametrize("parallel", MODES)
def test_ddp_trajectory_equals_one_process(ranks, one_process, backend, parallel):
    # 20 iterations of step() with a DDP-wrapped float64 LeNet: the state freezes after iteration 8 or so, so
    # the exported network also trains under DDP; data mode trains each rank on its half, population mode on
    # its slice of the whole batch
    mine, alone = ranks[0]["trajectory", backend, parallel], one_process("trajectory", backend, parallel)
    assert len(mine["best_state"]) == cases.ITERATIONS
    for i in range(cases.ITERATIONS):
        assert torch.equal(mine["best_state"][i], alone["best_state"][i]), f"iteration {i + 1}"
        assert torch.equal(mine["population"][i], alone["population"][i]), f"iteration {i + 1}"
        assert_close(mine["stored_energies"][i], alone["stored_energies"][i], rtol=1e-6)
    assert mine["converged"] and mine["compact_trainer_ran"]
    assert alone["converged"] and alone["compact_trainer_ran"]
    for name, value in alone["weights"].items():
        assert_close(mine["weights"][name], value, path="net", msg=name)  # float64 LeNet
    if backend == "compact":  # the CPU kept-channel training forward ran, inside DDP's forward
        assert mine["kept_forwards"] > 0 and mine["kept_forwards"] == alone["kept_forwards"]


@pytest.mark.parametrize("backend", cases.BACKENDS)
@pytest.mark.parametrize("parallel", MODES)
def test_states_and_weights_identical_across_ranks(ranks, backend, parallel):
    first, second = ranks[0]["trajectory", backend, parallel], ranks[1]["trajectory", backend, parallel]
    for key in ("population", "best_state", "stored_energies"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], second[key])), key
    for name, value in first["weights"].items():
        assert torch.equal(second["weights"][name], value), name


def test_model_hooks_run_once_in_a_ddp_training_forward(ranks):
    # the model's root hook doubles its logits; the training loss must be that of doubled logits, not quadrupled
    for r in range(WORLD):
        x, y = cases.shard(*cases.batch(8), r, WORLD)
        net = cases.model()
        net.register_forward_hook(cases.double)
        pruner = EDropout(net, x[:2], population_size=4, backend="reference")
        with torch.no_grad(), pruner.apply(ranks[r]["hooked"]["best_state"]):
            expected = torch.nn.functional.cross_entropy(net(x), y)
        # a float32 loss computed along two op orders: equal to float32 rounding; a hook run twice would double it
        assert_close(torch.tensor(ranks[r]["hooked"]["loss"]), expected, path="net", dtype=torch.float32)


def test_drifting_ranks_stop_with_a_clear_error_on_every_rank(ranks):
    for r in range(WORLD):
        assert ranks[r]["diverged"] is not None and "ranks diverged" in ranks[r]["diverged"]
        assert "same seed" in ranks[r]["diverged"]


def test_population_mode_refuses_different_batches_on_every_rank(ranks):
    for r in range(WORLD):
        assert "hold different batches" in ranks[r]["other_batches"]


def test_skipping_nonfinite_batches_is_refused_across_ranks(ranks):
    for r in range(WORLD):
        assert "on_nonfinite='skip' cannot be used across ranks" in ranks[r]["skip"]


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank(ranks):
    for r in range(WORLD):
        seen = ranks[r]["nonfinite_loss"]
        assert seen["unchanged"], f"rank {r} changed its weights"
        expected = "the training loss is" if r == 1 else "another rank's training loss is non-finite"
        assert seen["error"] and expected in seen["error"] and "at iteration 1; no weight was changed" in seen["error"]


def test_ranks_with_different_settings_are_refused_at_construction(ranks):
    for r in range(WORLD):
        assert "disagree on population_size" in ranks[r]["settings"]


def test_distributed_step_needs_a_ddp_model(ranks):
    for r in range(WORLD):
        assert "DistributedDataParallel(model)" in ranks[r]["bare_model"]


def test_parallel_modes_need_an_initialised_process_group(batch):
    x, _ = batch
    with pytest.raises(ValueError, match="init_process_group"):
        EDropout(cases.model().float(), x[:2], parallel="population")
    with pytest.raises(ValueError, match="unknown parallel mode"):
        EDropout(cases.model().float(), x[:2], parallel="members")


def test_torchrun_job_killed_mid_epoch_resumes_exactly(ranks, killed, directory):
    (epoch, position), output = killed  # each rank must take its own rows of the interrupted epoch again
    epochs = int(cases.CLI[cases.CLI.index("--epochs") + 1])
    assert epoch < epochs and position > 0, f"not killed mid-epoch (epoch {epoch}, batch {position}):\n{output}"
    assert [r["cli"]["codes"] for r in ranks] == [[0, 0], [0, 0]]
    straight, resumed = directory / "straight", directory / "killed"
    a, b = (json.loads((d / "report.json").read_text()) for d in (straight, resumed))
    assert a["world_size"] == b["world_size"] == WORLD and a["parallel"] == "data"
    for key in ("iterations", "converged_at_iteration", "top1_F", "top1_P", "percent_removed", "units_kept"):
        assert a[key] == b[key], key
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (straight, resumed))
    assert len(ha) == len(hb) == a["iterations"]
    assert [h["best_energy"] for h in ha] == pytest.approx([h["best_energy"] for h in hb], abs=1e-6)
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], abs=1e-5)


def test_only_rank_0_writes(ranks):
    assert {"atomic_save", "save_pruned_model", "write_json", "plot_history"} <= set(ranks[0]["cli"]["writes"])
    assert ranks[1]["cli"]["writes"] == []


def test_resume_with_another_world_size_is_refused_in_one_line(ranks, directory, capsys):
    from edropout.app.cli import main

    assert main(cases.cli_args(str(directory), "killed", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "written by 2 processes (--parallel data)" in err and "--nproc_per_node=2" in err


@pytest.mark.parametrize("count, world", [(5, 2), (32, 2), (7, 3), (2, 3), (64, 8)])
def test_snake_layout_deals_every_member_once_and_balances_sorted_costs(count, world):
    from edropout.distributed.scoring import snake_layout

    layout = snake_layout(count, world)
    dealt = layout[layout >= 0]
    assert sorted(dealt.tolist()) == list(range(count))
    sizes = (layout >= 0).sum(dim=1)
    assert int(sizes.max() - sizes.min()) <= 1
    costs = torch.arange(count, 0, -1, dtype=torch.float64)  # position p (sorted by cost) costs count - p
    work = torch.stack([costs[row[row >= 0]].sum() for row in layout])
    assert float(work.max() - work.min()) <= float(costs[0])  # within one member of each other


def test_a_bad_or_malformed_batch_on_one_rank_stops_every_rank_with_a_clear_error(tmp_path):
    # without the verdicts in the collectives the bad rank raised alone and the others waited for it in their next
    # collective: the group's 30 s timeout (and the join deadline here) turn such a hang into a failure
    context = mp.start_processes(cases.bad_batch_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks hung on a bad batch on one rank")
    seen = [torch.load(tmp_path / f"bad_batch_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for number, (parallel, how, call, bad) in enumerate(cases.BAD_BATCHES):
        for r in range(WORLD):
            found, together = seen[r][number]
            assert together == 2 * number, f"rank {r} left the other ranks behind after {parallel}/{how}/{call}"
            assert found is not None, f"rank {r} went on after a bad batch on rank {bad} ({parallel}/{how}/{call})"
            kind, message = found
            assert kind == ("NonFiniteError" if how == "nan" else "ValueError"), message
            if r == bad:
                assert cases.OWN_ERRORS[how] in message
            else:
                assert {"label": "another rank's batch has labels outside [0, 10)",
                        "nan": "another rank's batch holds non-finite values",
                        "empty": "another rank's batch is malformed",
                        "shape": "another rank's batch is malformed"}[how] in message
