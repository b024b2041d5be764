/// mimalloc instead of glibc's malloc: a coordinator's work is many small
/// short-lived allocations per node (requests, events), where glibc's
/// allocator took about a quarter of its CPU (`BENCHMARKS.md`). Built
/// without transparent huge pages (`no_thp`): with them an idle daemon's
/// RSS rose from 23 to 34 MiB, and a 10,000-node coordinator's peak from
/// 700 to 850 MiB; without, 21.7 MiB and about 650 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    autocollect::cli::main()
}
