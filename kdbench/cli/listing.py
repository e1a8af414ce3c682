"""`kdbench list`: methods, models, suites, recipes and datasets."""

from __future__ import annotations

import argparse
import textwrap

from ..recipe import RECIPES
from ..registry import load_methods
from ..suites import all_suites


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        for name, cls in load_methods(args.plugins).items():
            print(f"{name}  ({cls.teachers_taken()})\n  {cls.summary()}\n  paper: {cls.paper}")
            for hp, default in cls.hyperparameters().items():
                print(f"    {name}.{hp} = {default!r}")
            print()
    elif args.what == "suites":
        for su in all_suites():
            r = su.recipe
            extra = "; compare with `kdbench reproduce`" if su.reproduce else ""
            print(f"{su.name}: dataset {su.dataset}{f' padded to {su.pad_to}' if su.pad_to else ''}, recipe {r.label}, "
                  f"seeds {','.join(map(str, su.seeds))}, methods {','.join(su.methods) or 'all'}{extra}")
            print(textwrap.indent(textwrap.fill(su.description, 96), "  "))
            for pr in su.pairs:
                print(f"    {'+'.join(pr.teacher_labels)}:{pr.student}"
                      + (f"  ({', '.join(pr.methods)})" if pr.methods else ""))
            for model, extra_fields in su.recipe_by_model.items():
                print(f"    recipe for {model}: {', '.join(f'{k}={v}' for k, v in extra_fields.items())}")
            print(f"    file: {su.path}")
            print()
    elif args.what == "recipes":
        for r in RECIPES.values():
            print(f"{r.name}: {r.epochs} epochs, batch {r.batch_size}, lr {r.lr} x{r.gamma} at "
                  f"{'/'.join(map(str, r.milestones))}, momentum {r.momentum}, wd {r.weight_decay}, "
                  f"crop pad {r.crop_padding}, flip {r.flip}")
            print(textwrap.indent(textwrap.fill(r.description, 96), "  "))
    elif args.what == "datasets":
        from ..data import DATASETS
        for name in DATASETS:
            print(name)
        print("imagenet (an ImageFolder in <data folder>/imagenet: train/ and val/ class folders; not downloadable)")
        print("an ImageFolder path (a folder with train/ and val/ class folders)")
    elif args.what == "models":
        list_models()
    return 0


def list_models() -> None:
    """kdbench's zoo with parameters and MACs, counted on the models themselves."""
    from ..metrics import count_params, flops_per_image
    from ..models.crd_names import CRD_TO_TIMM
    from ..zoo import create

    print("kdbench's CIFAR zoo, registered in timm (CRD benchmark name -> timm name); 100 classes, 32x32 input.")
    print("Any other timm model name works too (timm.list_models()).\n")
    print(f"  {'CRD name':<12} {'timm name':<22} {'params':>11} {'MACs/image':>14}")
    groups = [("", [(crd, name) for crd, name in CRD_TO_TIMM.items()], 100, 3, 32),
              ("\n  Hinton et al. 2015 MNIST MLPs; 10 classes, 1x28x28 input.",
               [("", "hinton_mlp_1200"), ("", "hinton_mlp_800")], 10, 1, 28)]
    for heading, models, classes, chans, size in groups:
        if heading:
            print(heading)
        for crd, name in models:
            model = create(name, num_classes=classes, in_chans=chans, img_size=size)
            macs = flops_per_image(model, (chans, size, size)) // 2
            print(f"  {crd:<12} {name:<22} {count_params(model):>11,} {macs:>14,}", flush=True)
