"""Pixel AUROC / AU-PRO of trained bottle runs vs their image-independent mean map.

  python benchmarks/position_baseline.py   # reads /work/runs/bottle_* (docs/results.md)

If averaging the anomaly maps over the test set (the same map for every
image) scores as well as the per-image maps, the model's "localization" is a
positional prior, not a response to the defects.
"""
import sys, json, numpy as np, jax
sys.path.insert(0,'.')
from configs import mvtec
from cavga_jax import data, eval_lib, train_lib, sharding, checkpointing, metrics
for name, variant in [('bottle_R_u_ae0.01','R'), ('bottle_D_u_ae1','D')]:
  cfg = mvtec.get_config(); cfg.data.root='/work/shared/data/mvtec_bottle_256'; cfg.data.image_size=128; cfg.model.variant=variant
  wd=f'/work/runs/{name}'
  mesh=sharding.make_mesh(); _, test=data.get_datasets(cfg, wd)
  g,_,init_fn,_=train_lib.setup(cfg, mesh)
  target=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape,x.dtype,sharding=sharding.replicated(mesh)), jax.eval_shape(init_fn, jax.random.key(0)))
  st,_=checkpointing.restore_for_eval(wd, target)
  p=eval_lib.predict(jax.jit(eval_lib.make_eval_step(g)), st.gen_params, st.gen_batch_stats, test, 16, mesh)
  m=p['anomaly_map']; mean=np.broadcast_to(m.mean(0), m.shape)
  print(name, 'model', round(metrics.pixel_auroc(m, test.masks),3), 'image-independent mean map', round(metrics.pixel_auroc(mean, test.masks),3),
        'aupro', round(metrics.aupro(m, test.masks),3), round(metrics.aupro(mean, test.masks),3),
        'std across images / std across pixels', round(float(m.std(0).mean()),4), round(float(m.mean(0).std()),4))
