"""Sample a trained dit-moe checkpoint (DDPM or flow): a labelled grid, or N samples to a folder + ADM npz for FID.

    python sample.py runs/digits/checkpoints/step-0002000 --cfg-scale 3 --out grid.png
    accelerate launch sample.py RUN --num-samples 50000 --out samples/ --sampler ddpm --steps 250 --cfg-scale 1.5
    python sample.py FLOW_RUN --sampler heun --steps 25 --cfg-scale 1.8 --guidance-interval 0 0.7
    python sample.py RUN --target-experts 1.5 --num-samples 1000 --out sparse/ --fid ref.npz

Everything lives in dit_moe/sampling/ (cli.py); `python sample.py --help` lists the options.
"""
import sys

from dit_moe.sampling import main

if __name__ == "__main__":
    sys.exit(main())
