# bash completion for portguard(8)                         -*- shell-script -*-
#
# Static on purpose: pressing TAB runs no Python, only bash. The lists below mirror guard/cli.py;
# tests/unit/test_shipped_files.py fails when a command or option there is missing here.

_portguard()
{
    local cur=${COMP_WORDS[COMP_CWORD]}
    local prev=${COMP_WORDS[COMP_CWORD - 1]}
    local commands="apply status check monitor remove build demo import-portreserve"

    # --config=PATH arrives as three words when '=' is in COMP_WORDBREAKS: "--config" "=" "PATH".
    if [[ $cur == = ]]; then
        prev=${COMP_WORDS[COMP_CWORD - 1]}
        cur=
    elif [[ $prev == = && COMP_CWORD -ge 2 ]]; then
        prev=${COMP_WORDS[COMP_CWORD - 2]}
    fi

    if [[ $prev == --config ]]; then
        compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        return
    fi

    # The command is the first word that is neither a global option nor its argument.
    local command= i word
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        case $word in
            --config)
                ((i++))
                [[ ${COMP_WORDS[i]} == = ]] && ((i++))
                ;;
            -*) ;;
            *)
                command=$word
                break
                ;;
        esac
    done

    local options=
    case $command in
        "")
            if [[ $cur == -* ]]; then
                mapfile -t COMPREPLY < <(compgen -W "--config -h --help" -- "$cur")
            else
                mapfile -t COMPREPLY < <(compgen -W "$commands" -- "$cur")
            fi
            return
            ;;
        apply | remove | build | demo) options="-h --help" ;;
        status) options="--json -h --help" ;;
        check) options="--json -h --help" ;; # PORT: any number or service name, no list offered
        monitor)
            case $prev in
                --count | --duration) return ;; # a number
            esac
            options="--json --journal --count --duration -h --help"
            ;;
        import-portreserve)
            options="-h --help"
            if [[ $cur != -* ]]; then
                compopt -o filenames 2>/dev/null
                mapfile -t COMPREPLY < <(compgen -d -- "$cur")
                return
            fi
            ;;
        *) return ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$options" -- "$cur")
    fi
}
complete -F _portguard portguard
