"""The loop users write, on 4 gloo ranks against the serial model (one launch):

- global gradient-norm clipping, active every step (a max norm below the norm): with torch's
  own torch.nn.utils.clip_grad_norm_(cm.parameters(), ...) and with cm.clip_grad_norm_, the norm
  returned on every rank equals the serial norm and the parameters after 3 clipped AdamW steps
  equal the serial model's (1e-5), under dp4, dp2·tp2, ZeRO-3, pipelines (pp2·dp2, pp2·tp2 with
  the tied embedding/head on both stages) and a mixed per-layer plan; the inf- and 1-norms too;
- eval_step equals the serial model's torch.no_grad() loss in eval mode (dropout 0.3 in the
  model: eval turns it off) and leaves the compiled model in train mode;
- gradient accumulation over 4 train_steps (3 under no_sync) and over 4 synced ones equals the
  serial model's 4 backward passes; rank-local batches (local=True, the rank's part by
  cm.data_rank / data_world) give the global form's loss and gradients;
- an optimizer that is not elementwise (Adafactor) is refused when the plan splits parameters,
  and runs when it does not;
- pcompile.trainer.train with rank-local loading, clipping and evaluation equals the same loop on
  the serial model."""
import pcompile
from tests.distributed.ranks_loop import run_all

CLIP = [("dp4",), ("dp2·tp2",), ("zero3",), ("pp2·dp2",), ("pp2·tp2",), ("mixed",),
        ("dp2·tp2", float("inf")), ("zero3", 1.0, False), ("mixed", 2.0, False)]
EVAL = ["dp4", "dp2·tp2", "zero3", "pp2·dp2", "mixed"]
ACCUMULATE = ["dp4", "dp2·tp2", "zero3", "pp2·dp2", "mixed"]
OPTIMIZERS = ["dp2·tp2", "zero3", "dp4"]
TRAINER = ["dp2·tp2", "pp2·dp2"]


def test_clipping_evaluation_accumulation_and_local_data_match_serial():
    per_rank = pcompile.launch(run_all, 4, CLIP, EVAL, ACCUMULATE, OPTIMIZERS, TRAINER, timeout=900)
    for result in per_rank:
        for r in result["clip"]:
            assert r["norm_rel_diff"] < 1e-5 and r["param_diff"] < 1e-5, r
            assert all(norm > r["max_norm"] for norm, _ in r["norms"]), r  # clipping was active
        for r in result["eval"]:
            assert r["eval_diff"] < 1e-5 and r["training_after"], r
        for r in result["accumulation"]:
            assert r["no_sync_diff"] < 1e-6 and r["synced_diff"] < 1e-6, r
            assert r["local_loss_diff"] < 1e-6 and r["local_grad_diff"] < 1e-6, r
        refused = dict(zip(OPTIMIZERS, result["optimizers"]))
        assert "Adafactor updates each parameter from the whole tensor" in refused["dp2·tp2"]
        assert "use an elementwise optimizer" in refused["zero3"]
        assert refused["dp4"] == ""  # every tensor whole: any optimizer is exact
        for r in result["trainer"]:  # pcompile.trainer.train: rank-local data, clipping, evaluation
            assert r["diff"] < 1e-5 and r["evaluated"] == 2 and r["samples"] == 8, r
    data = {tuple(r["data"]) for result in per_rank for r in result["accumulation"] if r["plan"] == "dp2·tp2"}
    assert data == {(0, 2), (1, 2)}  # the tp pairs share a part
