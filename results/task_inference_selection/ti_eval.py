import numpy as np, torch, sys, time, itertools
torch.set_num_threads(1)
from load import load
from spacenet.strategy.task_inference import TaskInference
name = sys.argv[1]; seed = int(sys.argv[2]); grid = eval(sys.argv[3])
Xtr, ytr, _, _ = load(name)
rng = np.random.default_rng(1000 + seed); val = rng.random(len(ytr)) < 0.1
A, ya, B, yb = torch.tensor(Xtr[~val]), torch.tensor(ytr[~val]), torch.tensor(Xtr[val]), torch.tensor(ytr[val])
for kw in grid:
    ti = TaskInference(input_range=(0, 255), seed=seed, **kw)
    t0 = time.time()
    for t in range(5):
        m = (ya // 2) == t
        ti.fit_task(t, A[m], ya[m])
    fit = time.time() - t0; t0 = time.time()
    ll = ti.class_log_likelihood(B); pt = ti.predict_task(B)
    print(name, seed, kw, f"10way={(ll.argmax(1)==yb).float().mean():.4f} task={(pt==yb//2).float().mean():.4f} fit={fit:.1f}s score={time.time()-t0:.1f}s bytes={ti.nbytes}", flush=True)
