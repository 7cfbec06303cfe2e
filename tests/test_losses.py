"""Each loss against a plain reference: values and gradients, for several chunk sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vaemo.losses import TopKTargets, distill, language_loss, log1mexp, teacher_topk, va_loss

N, D, V = 37, 16, 101


@pytest.fixture
def setup():
    torch.manual_seed(0)
    head = nn.Linear(D, V, bias=False)
    student = torch.randn(N, D, requires_grad=True)
    teacher = torch.randn(N, D)
    return head, student, teacher


def reference_kl(head, student, teacher, tau):
    s = F.log_softmax(head(student) / tau, -1)
    with torch.no_grad():  # the teacher is a fixed target
        t = F.log_softmax(head(teacher) / tau, -1)
    return tau**2 * (t.exp() * (t - s)).sum()


def reference_topk_kl(head, student, teacher, tau, k):
    t_full = F.log_softmax(head(teacher) / tau, -1)
    t_top, ids = t_full.topk(k, -1)
    s_full = F.log_softmax(head(student) / tau, -1)
    s_top = s_full.gather(-1, ids)
    t = torch.cat([t_top, torch.log(1 - t_top.exp().sum(-1, keepdim=True))], -1)
    s = torch.cat([s_top, torch.log(1 - s_top.exp().sum(-1, keepdim=True))], -1)
    return tau**2 * (t.exp() * (t - s)).sum()


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunked_full_kl_matches_reference_values_and_gradients(setup, chunk, tau):
    head, student, teacher = setup
    head.weight.requires_grad_(True)
    ref = reference_kl(head, student, teacher, tau)
    ref_grads = torch.autograd.grad(ref, [student, head.weight])
    result = distill(student, head, teacher, temperature=tau, chunk_size=chunk)
    grads = torch.autograd.grad(result.kl_sum, [student, head.weight])
    assert result.count == N
    assert torch.allclose(result.kl_sum, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


def test_kl_is_zero_for_identical_inputs_and_agreement_counts_top1(setup):
    head, student, _ = setup
    result = distill(student, head, student.detach().clone(), chunk_size=5)
    assert abs(float(result.kl_sum)) < 1e-5 and result.agree == N
    other = distill(student, head, -student.detach(), chunk_size=5)
    expected = int((head(student).argmax(-1) == head(-student).argmax(-1)).sum())
    assert other.agree == expected


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_topk_kl_with_tail_bucket_matches_reference(setup, k, chunk):
    head, student, teacher = setup
    tau = 1.5
    ref = reference_topk_kl(head, student, teacher, tau, k)
    (ref_grad,) = torch.autograd.grad(ref, [student])
    targets = teacher_topk(teacher, head, k, temperature=tau, chunk_size=chunk)
    assert targets.ids.shape == (N, k)
    result = distill(student, head, targets, temperature=tau, chunk_size=chunk)
    (grad,) = torch.autograd.grad(result.kl_sum, [student])
    assert torch.allclose(result.kl_sum, ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-6)


def test_topk_over_the_whole_vocabulary_equals_the_full_kl(setup):
    head, student, teacher = setup
    full = distill(student, head, teacher, chunk_size=8).kl_sum
    topk = distill(student, head, teacher_topk(teacher, head, V), chunk_size=8).kl_sum
    assert torch.allclose(full, topk, rtol=1e-4, atol=1e-5)


def test_topk_targets_from_a_cache_give_the_same_loss(setup):
    """Offline cache: the targets written as two clips' cache files, read back and joined the way stage 1
    joins a batch's records, give the online loss (a narrower dtype or a reordering on disk would not)."""
    from vaemo.data.teacher_records import TeacherRecord, decode_record, encode_record

    head, student, teacher = setup
    online = teacher_topk(teacher, head, 8)
    split = N // 3
    records = [
        decode_record(
            encode_record(
                TeacherRecord(
                    "fp",
                    [("prompt", "response")],
                    [stop - start],
                    online.ids[start:stop].numpy(),
                    online.logprobs[start:stop].numpy(),
                    online.tail[start:stop].numpy(),
                )
            )
        )
        for start, stop in ((0, split), (split, N))
    ]
    cached = TopKTargets.joined(records)
    a = distill(student, head, online).kl_sum
    b = distill(student, head, cached).kl_sum
    assert abs(float(a) - float(b)) < 1e-6 * max(1.0, abs(float(a)))


@pytest.mark.parametrize("chunk", [1, 6, 1000])
def test_chunked_language_loss_matches_cross_entropy(setup, chunk):
    head, hidden, _ = setup
    targets = torch.randint(0, V, (N,))
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, [hidden])
    loss = language_loss(hidden, head, targets, chunk_size=chunk)
    (grad,) = torch.autograd.grad(loss, [hidden])
    assert torch.allclose(loss, ref, rtol=1e-5) and torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_log1mexp_is_stable():
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)


def ccc_rank(rank: int, world_size: int, init_file: str, out: str, split: int, unlabelled: list[int]) -> None:
    """One rank of the CCC test: its share of 8 rows (rank 0 the first `split` of two ranks), the loss and the
    mean of the gradients over ranks, as DeepSpeed takes it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(3)
    features, target = torch.randn(8, 5), torch.rand(8, 2) * 2 - 1
    target[unlabelled] = float("nan")
    head = torch.nn.Linear(5, 2)  # the same weights on every rank (seeded)
    rows = slice(0, 8) if world_size == 1 else slice(0, split) if rank == 0 else slice(split, 8)
    loss = va_loss(torch.tanh(head(features[rows])), target[rows], "ccc", world_size)
    loss.backward()
    grads = [head.weight.grad, head.bias.grad]
    for grad in grads:
        dist.all_reduce(grad)
        grad /= world_size
    values = [torch.zeros(()) for _ in range(world_size)]
    dist.all_gather(values, loss.detach())
    if rank == 0:
        torch.save({"losses": [float(v) for v in values], "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("split,unlabelled", [(4, [6]), (7, [6]), (6, [6, 7])], ids=["4+3", "6+1", "6+0"])
def test_ccc_is_the_whole_batchs_on_every_rank_with_its_gradient(tmp_path, split, unlabelled):
    """A concordance over a rank's share of a batch (a handful of clips on a 7B run) is a noisier statistic
    than the batch's, and averaging it over ranks is not the batch's value. Over 2 ranks, each rank's loss is
    the one process's over all 8 rows, and the gradients DeepSpeed averages are that loss's: also where a rank
    holds one labelled row, or none (no concordance of its own; every rank must still join the sum)."""
    import torch.multiprocessing as mp

    def run(world_size: int) -> dict:
        out = tmp_path / f"ccc{world_size}.pt"
        init = str(tmp_path / f"init{world_size}")
        args = (world_size, init, str(out), split, unlabelled)
        mp.start_processes(ccc_rank, args=args, nprocs=world_size, start_method="spawn")
        return torch.load(out)

    one, two = run(1), run(2)
    assert two["losses"] == pytest.approx(one["losses"] * 2, abs=1e-6)
    for got, expected in zip(two["grads"], one["grads"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert one["grads"][0].abs().sum() > 0


def test_va_losses_match_references_and_skip_missing_labels():
    torch.manual_seed(1)
    pred = (torch.rand(8, 2) * 2 - 1).requires_grad_(True)
    target = torch.rand(8, 2) * 2 - 1
    target[3] = float("nan")
    known = torch.ones(8, dtype=torch.bool)
    known[3] = False
    assert torch.allclose(va_loss(pred, target, "mse"), ((pred[known] - target[known]) ** 2).mean())

    def ccc(x, y):
        x, y = x.detach().numpy().astype("float64"), y.numpy().astype("float64")
        cov = ((x - x.mean()) * (y - y.mean())).mean()
        return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)

    expected = 1 - (ccc(pred[known, 0], target[known, 0]) + ccc(pred[known, 1], target[known, 1])) / 2
    loss = va_loss(pred, target, "ccc")
    assert abs(float(loss) - expected) < 1e-5
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert float(va_loss(pred, torch.full((8, 2), float("nan")), "mse")) == 0.0
    assert float(va_loss(target.nan_to_num(0.0), target.nan_to_num(0.0), "ccc")) < 1e-6
