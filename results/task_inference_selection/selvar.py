"""Selection seeds: train SpaceNet once per (benchmark, seed), fit every task-inference variant
at each task's end from the task's own data, score the test set after the last task."""
import sys, json, time, torch
torch.set_num_threads(1)
from avalanche.core import SupervisedPlugin
from spacenet.strategy.benchmarks import build_benchmark, BENCHMARKS
from spacenet.strategy.baselines import build_strategy, TrainSettings, make_model
from spacenet.strategy.seeding import seed_everything, seed_experience
from spacenet.strategy.plugin import dataset_tensors
from spacenet.strategy.task_inference import TaskInference
VARIANTS = {
  "m4r8e2": dict(components=4, rank=8, em_iterations=2),
  "m4r8e0": dict(components=4, rank=8, em_iterations=0),
  "m2r18e2": dict(components=2, rank=18, em_iterations=2),
  "m3r11e2": dict(components=3, rank=11, em_iterations=2),
  "m1r38": dict(components=1, rank=38, em_iterations=0),
}
class FitAll(SupervisedPlugin):
    def __init__(self, tis): super().__init__(); self.tis = tis; self.secs = {k: 0.0 for k in tis}
    def after_training_exp(self, strategy, **kw):
        x, y = dataset_tensors(strategy.experience.dataset)
        for k, ti in self.tis.items():
            t0 = time.process_time(); ti.fit_task(strategy.clock.train_exp_counter, x, y); self.secs[k] += time.process_time() - t0
name = sys.argv[1]; out = {}
info = BENCHMARKS[name]
bm = build_benchmark(name, n_experiences=5)
s = TrainSettings(input_range=info.input_range, input_size=info.input_size)
for seed in map(int, sys.argv[2].split(",")):
    seed_everything(seed); model = make_model(info)
    tis = {k: TaskInference(input_range=info.input_range, seed=seed, **v) for k, v in VARIANTS.items()}
    fit = FitAll(tis)
    st = build_strategy("spacenet", model, s, seed, plugins=[fit])
    t0 = time.process_time()
    for i, exp in enumerate(bm.train_stream):
        seed_experience(seed, i); st.train(exp)
    train = time.process_time() - t0
    model.eval(); res = {"train_cpu": train, "fit_cpu": fit.secs}
    accs = {}
    for e in bm.test_stream:
        x, y = dataset_tensors(e.dataset)
        with torch.no_grad(): lg = model(x)
        a = {"faithful": (lg.argmax(1) == y).float().mean().item()}
        for k, ti in tis.items():
            post = ti.task_log_posterior(x)[1]
            a[k + ":task"] = (post.argmax(1) == y // 2).float().mean().item()
            for cw in [0.0, 0.03, 0.1]:
                ti.class_weight = cw
                a[f"{k}:cw{cw}"] = (ti.apply(lg, x).argmax(1) == y).float().mean().item()
            a[k + ":alone"] = (ti.class_log_likelihood(x).argmax(1) == y).float().mean().item()
        for k, v in a.items(): accs.setdefault(k, []).append(v)
    res["acc"] = {k: sum(v) / len(v) for k, v in accs.items()}
    out[seed] = res
    print(name, seed, json.dumps(res), flush=True)
json.dump(out, open(f"select_{name}_{sys.argv[2]}.json", "w"), indent=1)
