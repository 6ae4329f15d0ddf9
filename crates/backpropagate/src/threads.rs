//! How many threads the CPU kernels use. rayon and candle default to one per logical
//! CPU; on a machine with SMT two threads then share each core's vector units, and the
//! matrix products (most of a training step) run slower than with one per physical
//! core. A user's `RAYON_NUM_THREADS` is kept.

/// Sets `RAYON_NUM_THREADS` (read by rayon's pool and by candle) to the number of
/// physical cores unless the user set it. Call first thing in `main`, before any
/// thread starts: the environment is process-wide.
pub fn use_physical_cores() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let physical = num_cpus::get_physical();
    if physical > 0 && physical < num_cpus::get() {
        std::env::set_var("RAYON_NUM_THREADS", physical.to_string());
    }
}
