"""The options ``dcnv2 train`` and ``dcnv2 train-cls`` share (optimizer, run directory, progress and
TensorBoard) and the :class:`~dcnv2.engine.TrainConfig` fields both take straight from them."""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional


def add_optimizer_options(g, *, optimizer_help: Optional[str] = None) -> None:
    """--optimizer, --momentum, --weight-decay, --offset-lr-mult, --amp, --clip-grad-norm, --seed."""
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help=optimizer_help)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum / AdamW beta1")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--offset-lr-mult", type=float, default=0.1, help="lr factor of offset/modulation branches")
    g.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    g.add_argument("--clip-grad-norm", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)


def add_run_options(g, *, out_help: str, checkpoint_every: int) -> None:
    """--out, --resume, --checkpoint-every, --log-every, --device."""
    g.add_argument("--out", required=True, help=out_help)
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoint_last.pth (or the given checkpoint)")
    g.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="iterations")
    g.add_argument("--log-every", type=int, default=20, help="iterations")
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")


def add_output_options(g, *, evaluation: str) -> None:
    """--no-progress and --tensorboard (``evaluation``: what the final evaluation adds to the events)."""
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also write every logged scalar, and {evaluation}, to OUT/tb/ (needs tensorboard: pip "
                        f"install 'dcnv2[tb]'; `tensorboard --logdir OUT/tb`)")


def train_config_kwargs(args) -> Dict[str, Any]:
    """The TrainConfig fields that both commands' options give as they are (the lr and warm-up each command works
    out itself)."""
    return dict(out=args.out, epochs=args.epochs, max_iters=args.max_iters, batch_size=args.batch_size,
                optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                offset_lr_mult=args.offset_lr_mult, warmup_factor=args.warmup_factor, lr_steps=tuple(args.lr_steps),
                gamma=args.gamma, amp=args.amp, clip_grad_norm=args.clip_grad_norm,
                checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
                num_workers=args.workers, device=args.device, progress=not args.no_progress,
                tensorboard=args.tensorboard)
