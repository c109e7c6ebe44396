# Recipes delegate to dev.sh (which also works where `just` is not installed) and so to `tf4ctr`.
setup:
    ./dev.sh setup

demo *ARGS:
    ./dev.sh demo {{ARGS}}

test *ARGS:
    ./dev.sh test {{ARGS}}

bench *ARGS:
    ./dev.sh bench {{ARGS}}

frappe *ARGS:
    ./dev.sh tf4ctr train --config frappe_x1 --train ../shared/data/frappe/train.csv --valid ../shared/data/frappe/valid.csv --test ../shared/data/frappe/test.csv --group-col user {{ARGS}}
