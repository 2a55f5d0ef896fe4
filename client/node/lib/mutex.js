// An async mutex: the driver's update lock.

/** A FIFO lock for async code. It guards no data by itself; see its users. */
export class Mutex {
  #locked = false;
  /** @type {Array<() => void>} */
  #waiters = [];

  get locked() {
    return this.#locked;
  }

  /** Wait for the lock; resolves with the function that releases it. */
  acquire() {
    if (!this.#locked) {
      this.#locked = true;
      return Promise.resolve(() => this.#release());
    }
    return new Promise((resolve) => this.#waiters.push(() => resolve(() => this.#release())));
  }

  /**
   * Run `fn` with the lock held and release it whatever happens.
   * @template T
   * @param {() => T | Promise<T>} fn
   * @returns {Promise<T>}
   */
  async run(fn) {
    const release = await this.acquire();
    try {
      return await fn();
    } finally {
      release();
    }
  }

  #release() {
    const next = this.#waiters.shift();
    if (next) next(); // ownership passes straight to the next waiter
    else this.#locked = false;
  }
}
