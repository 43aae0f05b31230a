"""Input-pipeline benchmark: images/s of each fastkd data backend vs torchvision's ImageFolder.

Same as ``fastkd bench data``. Examples:

    python benchmarks/bench_data.py --device cpu --results benchmarks/results/data-cpu.jsonl
    python benchmarks/bench_data.py --device cuda --num-images 2048 --batch-size 256 \
        --results benchmarks/results/data-gpu.jsonl
"""
import argparse

from fastkd.bench import data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_arguments(parser)
    return data.main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
