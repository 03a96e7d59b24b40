//! The `conala` command line: parse, call into the library, print (the commands live in `cli/`).

mod cli;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: cli::memory::Counting = cli::memory::Counting(mimalloc::MiMalloc);

fn main() {
    cli::memory::count_if_asked();
    cli::memory::keep_freed_memory();
    cli::logging::init_logging();
    cli::signals::install();
    let args = cli::args::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(cli::dispatch(args)) {
        // A run stopped by a signal exits as the shell expects of that signal (130, 143).
        let code = match e.downcast_ref::<conala::Error>() {
            Some(conala::Error::Interrupted { signal, .. }) => signal.exit_code(),
            _ => 1,
        };
        eprintln!(
            "error: {}",
            conala::secrets::redact(&cli::logging::error_chain(&e))
        );
        std::process::exit(code);
    }
}
