"""What the demo trains: a generated dataset and a random-init resnet18 at 48 px, a few minutes on two CPU cores.

No imports beyond the standard library, so `pets --help` stays quick. The recipe's own defaults are in lib/recipe.py.

Two x86-64 machines of one CPU family give the demo the same error rate with the same library versions. What can
make two CPU runs of one recipe differ, and how the demo pins it:
- the thread count: a CPU reduction (a convolution's weight gradient, a sum) is split by the number of intra-op
  threads, so its fp32 result differs in the last bits between counts and training drifts apart from there (measured
  here: 1 and 2 threads part at the first unfrozen epoch); torch's default is one thread per core, so the demo fixes
  `threads`;
- the instruction set: oneDNN (the convolutions), ATen's own kernels and MKL (the matrix products) each pick
  AVX-512 code where the CPU has it and AVX2 code elsewhere, and they round differently; the demo caps all three at
  AVX2 (`ONEDNN_MAX_CPU_ISA`, oneDNN docs "CPU Dispatcher Control"; `ATEN_CPU_CAPABILITY`, PyTorch
  aten/src/ATen/native/DispatchStub.cpp; `MKL_ENABLE_INSTRUCTIONS`, oneMKL developer guide "Instruction Set
  Specific Dispatching"), which Intel CPUs have since 2013 (Haswell) and AMD ones since 2015. Each is read when its
  library first runs, so they are set before the flow's stage processes start, which inherit them. Measured: on an
  AMD EPYC with AVX-512 the oneDNN cap alone sufficed (ATen and MKL gave the same bits either way); on an Intel
  Xeon with AVX-512 ATen's or MKL's AVX-512 code changed the numbers too, and with all three capped a one-thread
  default run and a two-thread AVX2-only one agreed. With the caps, that Xeon still reached other numbers than the
  EPYC (best epoch 8 of 8 against 5 of 8): the libraries' AVX2 paths are not the same on both vendors' CPUs;
- randomness: the split, the initialisation, the crops, the augmentation and the dropout all derive from the recipe's
  seed, whatever the loader's workers (lib/train/trainer.py); the demo keeps no workers, and none of its operations
  runs a non-deterministic kernel on the CPU (under torch.use_deterministic_algorithms(True) a fine_tune raised
  nothing and gave the same bits).
"""

DEMO_BREEDS = 6
DEMO_IMAGES_PER_BREED = 24
DEMO_EPOCHS = 8  # on the demo data the best epoch comes before the last, so the retraining step runs too
DEMO_EXPERIMENT = "pets-demo"
# One thread: on a machine whose cores other programs also use, a second thread waits at every parallel region for a
# core (a resnet18 step on 16 pictures of 64 px took 4.2 s on 2 threads against 0.5 s on 1, on the 2 busy cores
# measured here), and on idle cores it gains less than 2x.
DEMO_THREADS = 1
# The demo's recipe, by option name (`Recipe.updated`): CPU, fp32 and no download (pretrained weights need the network).
DEMO_SETTINGS = {
    "arch": "resnet18",
    "pretrained": False,
    # 48 px crops of 64 px images, 8 to a batch: 14 batches an epoch, the best probe epoch is the 5th of 8 and the
    # retrained model gets 2 of 29 wrong. 64 px and 96 px took a third longer for a best epoch of 7 of 8; batches
    # of 16 learnt less (best 6 of 8, then 5 of 29 wrong).
    "presize": 64,
    "size": 48,
    "bs": 8,
    "freeze_epochs": 1,
    "epochs": DEMO_EPOCHS,
    "baseline_epochs": 1,
    "fp16": False,
    "device": "cpu",
    "workers": 0,  # two cores: worker processes cost more than they save on a dataset this small
    # The drawn pets share shapes and plain backgrounds, so their perceptual hashes are close: at 10 bits, 48 of 144
    # drawn pets fell into 21 "near-duplicate" groups, none a real copy. Grouping them would only move pictures
    # between the splits, away from the numbers measured on both CPU families (README).
    "find_duplicates": False,
    "threads": DEMO_THREADS,
    "experiment": DEMO_EXPERIMENT,
    "registered_model": "pets-demo-classifier",
}
# oneDNN's, ATen's and MKL's instruction-set caps (see above): the same kernels, so the same rounding.
DEMO_ENVIRONMENT = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
