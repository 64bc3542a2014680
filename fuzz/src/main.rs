//! The AFL++ harness: `unitune-fuzz TARGET` runs one target of [`unitune_fuzz::TARGETS`] in
//! AFL's persistent mode (see the README's "Fuzzing" section for the command);
//! `unitune-fuzz TARGET FILE...` runs it once on each file instead (to replay a finding or
//! measure memory: outside AFL, the persistent loop stops itself between inputs).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(target) = args.first().and_then(|name| unitune_fuzz::target(name)) else {
        let names: Vec<&str> = unitune_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "usage: unitune-fuzz TARGET [FILE...] (TARGET: {})",
            names.join(", ")
        );
        std::process::exit(2);
    };
    if args.len() > 1 {
        for file in &args[1..] {
            target(&std::fs::read(file).expect("readable input"));
        }
        return;
    }
    afl::fuzz!(|data: &[u8]| target(data));
}
