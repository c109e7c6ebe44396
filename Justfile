# Recipes delegate to dev.sh, which also works where `just` is not installed.
setup:
    ./dev.sh setup

demo *ARGS:
    ./dev.sh demo {{ARGS}}

test *ARGS:
    ./dev.sh test {{ARGS}}

bench *ARGS:
    ./dev.sh bench {{ARGS}}

frappe *ARGS:
    .venv/bin/python jobs/train_bars.py --train ../shared/data/frappe/train.csv --valid ../shared/data/frappe/valid.csv --test ../shared/data/frappe/test.csv --group-col user {{ARGS}}
