/// mimalloc instead of glibc's malloc: a coordinator's work is many small
/// short-lived allocations per node (requests, events), where glibc's
/// allocator took about a quarter of its CPU (`BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    autocollect::cli::main()
}
