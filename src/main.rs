//! The `crucible` binary: a thin edge over [`crucible::cli`].

/// Optional allocator (feature `mimalloc`); the C library's otherwise.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc keeps freed memory committed for a while and commits whole arenas eagerly:
/// fast, but the appliance's RSS doubled under load (BENCHMARKS.md). Return memory at
/// once and commit on demand. Option ids of mimalloc v3 as built by libmimalloc-sys
/// =0.1.49: arena_eager_commit = 4, purge_delay = 15.
#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    // SAFETY: plain option setters, called before any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(4, 0);
        libmimalloc_sys::mi_option_set(15, 0);
    }
}

fn main() {
    // No transparent huge pages for this process and its children (the sandbox helpers,
    // which inherit it): the allocator's arena was made before `main` (too early for its
    // own options) with huge pages allowed, so each thread's first allocations committed
    // and zeroed whole 2 MiB pages: 43 MiB of RSS at idle, and zeroing in every helper.
    // SAFETY: prctl with plain integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    #[cfg(feature = "mimalloc")]
    tune_allocator();
    // The sandbox helper must stay single-threaded: dispatch before anything starts threads.
    if std::env::args_os().nth(1).is_some_and(|a| a == "__sandbox") {
        std::process::exit(crucible::executor::helper::main());
    }
    std::process::exit(crucible::cli::main());
}

#[cfg(all(test, feature = "mimalloc"))]
mod tests {
    #[test]
    fn allocator_options_take_effect() {
        super::tune_allocator();
        // SAFETY: plain option getters.
        let (eager, purge) = unsafe {
            (
                libmimalloc_sys::mi_option_get(4),
                libmimalloc_sys::mi_option_get(15),
            )
        };
        assert_eq!(
            (eager, purge),
            (0, 0),
            "option ids moved: check libmimalloc-sys"
        );
    }
}
